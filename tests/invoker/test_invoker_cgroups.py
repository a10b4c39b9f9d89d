"""The local invoker on real v1 cgroups and worker processes (root: ``v1_root``)."""

from __future__ import annotations

import asyncio
import math
import os
import uuid
from dataclasses import replace

from sidecar import cgroups
from training.invoker.functions import BY_NAME
from training.invoker.invoker import Arrival, Containers, Invoker


def _exists(parent: str) -> bool:
    return any(
        os.path.exists(os.path.join(cgroups.DEFAULT_ROOT, c, parent))
        for c in cgroups.V1_CONTROLLERS
    )


def test_two_containers_replay_then_cleanup(v1_root: None) -> None:
    parent = f"faasrm-test-invoker-{uuid.uuid4().hex[:8]}"
    specs = [BY_NAME["pyloop"], BY_NAME["memhog"]]
    containers = Containers(parent, specs)
    invs = [
        Arrival(i, 0.5 * i, specs[i % 2].name, specs[i % 2].input_size((i % 5) / 5))
        for i in range(20)
    ]  # ~10 s, both containers busy
    seen: dict = {}

    async def main() -> list:
        try:
            await containers.start()
            for c in containers.values():
                lim = c.cg.read_limits()
                seen[c.name] = (lim.cpu_quota_cores, lim.mem_limit_bytes, list(c.cg.pids()))
            return await Invoker(containers).replay(invs)
        finally:
            await containers.stop()

    records = asyncio.run(main())
    assert [r.idx for r in sorted(records, key=lambda r: r.idx)] == list(range(20))
    assert all(r.outcome == "success" and r.exec_s > 0 for r in records), records
    assert all(r.response_s >= r.exec_s for r in records)
    assert seen["pyloop"][:2] == (0.5, 128 * 2**20)  # the user's size: 128 MB -> 0.5 core
    assert seen["memhog"][:2] == (2.0, 512 * 2**20)
    assert all(pids for *_, pids in seen.values())  # a worker inside each cgroup
    worker_pids = [p for *_, pids in seen.values() for p in pids]
    assert not _exists(parent)
    assert not any(
        os.path.exists(f"/proc/{p}")
        and b"training.invoker.worker" in open(f"/proc/{p}/cmdline", "rb").read()
        for p in worker_pids
    )


def test_timeout_kills_the_worker_and_respawn_decides_whether_it_comes_back(v1_root: None) -> None:
    parent = f"faasrm-test-invoker-{uuid.uuid4().hex[:8]}"
    containers = Containers(parent, [BY_NAME["sleepy"]])

    async def main() -> tuple:
        try:
            await containers.start(warm=False)
            c = containers["sleepy"]
            slow = await c.run(1000.0, timeout_s=0.2)  # sleeps ~1 s: killed at 0.2 s
            after = await c.run(100.0)  # respawned: serves the next one
            dead = await c.run(1000.0, timeout_s=0.2, respawn=False)
            return slow, after, dead, c.restarts, c.proc.returncode
        finally:
            await containers.stop()

    slow, after, dead, restarts, code = asyncio.run(main())
    assert slow[1] == "timeout" and 0.2 <= slow[0] < 1.0, slow
    assert after[1] == "success", after
    assert dead[1] == "timeout" and restarts == 1 and code is not None  # left dead
    assert not _exists(parent)


def test_oom_kill_is_recorded_and_worker_restarted(v1_root: None) -> None:
    parent = f"faasrm-test-invoker-{uuid.uuid4().hex[:8]}"
    containers = Containers(parent, [BY_NAME["memhog"]], ratio=1 / 128)
    containers["memhog"].user_mem_mb = 96.0  # the user's guess is below the working set

    async def main() -> list:
        try:
            await containers.start(warm=False)
            return await Invoker(containers).replay(
                [Arrival(0, 0.0, "memhog", 200.0), Arrival(1, 0.1, "memhog", 20.0)]
            )
        finally:
            await containers.stop()

    first, second = sorted(asyncio.run(main()), key=lambda r: r.idx)
    assert first.outcome == "oom", first
    assert second.outcome == "success", second  # the restarted worker serves the next one
    assert not _exists(parent)


def test_pending_counts_every_arrival_waiting_on_the_invoker_not_only_the_functions_own(
    v1_root: None,
) -> None:
    """The start hook's ``pending`` is the simulator's admission queue: every arrival on this
    invoker not yet started. A function whose container is idle still sees another's backlog."""
    parent = f"faasrm-test-invoker-{uuid.uuid4().hex[:8]}"
    loop, hog = BY_NAME["pyloop"], BY_NAME["memhog"]  # pyloop: ~1.3 s a call at its 0.5 core
    containers = Containers(parent, [loop, hog])
    invs = [Arrival(i, 0.05 * i, loop.name, loop.input_size(1.0)) for i in range(3)]
    invs.append(Arrival(3, 0.6, hog.name, hog.input_size(0.0)))

    async def main() -> list:
        try:
            await containers.start(warm=False)
            return await Invoker(containers).replay(invs)
        finally:
            await containers.stop()

    recs = sorted(asyncio.run(main()), key=lambda r: r.idx)
    assert all(r.outcome == "success" for r in recs), recs
    assert recs[0].exec_s > 0.6, recs[0]  # the two later pyloop calls still wait at 0.6 s
    assert recs[3].start_s < recs[1].start_s  # memhog's container was idle: it started at once
    assert [r.pending for r in recs] == [0, 1, 0, 2], recs  # per container it would be 0 for hog


def test_a_memory_pool_holds_a_call_back_until_its_allocation_fits(v1_root: None) -> None:
    """``memory_mb``: memhog (512 MB) waits for pyloop (128 MB) to end although its own container
    is idle, and a later pyloop call waits behind it: first come, first served."""
    parent = f"faasrm-test-invoker-{uuid.uuid4().hex[:8]}"
    loop, hog = BY_NAME["pyloop"], BY_NAME["memhog"]
    containers = Containers(parent, [loop, hog])
    invs = [
        Arrival(0, 0.0, loop.name, loop.input_size(1.0)),  # ~1.3 s at its 0.5 core
        Arrival(1, 0.2, hog.name, hog.input_size(0.0)),
        Arrival(2, 0.4, loop.name, loop.input_size(0.0)),
    ]

    async def main() -> list:
        try:
            await containers.start(warm=False)
            return await Invoker(containers, memory_mb=512).replay(invs)
        finally:
            await containers.stop()

    first, hog_call, second = sorted(asyncio.run(main()), key=lambda r: r.idx)
    assert all(r.outcome == "success" for r in (first, hog_call, second))
    assert hog_call.start_s >= first.start_s + first.exec_s  # 128 + 512 > 512: it waited
    assert hog_call.response_s > hog_call.exec_s + 0.5  # the wait is response time
    assert second.start_s >= hog_call.start_s + hog_call.exec_s  # behind memhog, not beside it
    assert not _exists(parent)


def test_invoker_applies_a_local_manager_and_restores_the_user_size(v1_root: None) -> None:
    from sidecar.core.grid import ResourceGrid
    from training.baselines import Vpa

    parent = f"faasrm-test-invoker-{uuid.uuid4().hex[:8]}"
    spec = BY_NAME["sleepy"]  # 512 MB / 2 cores user, ~0 cores and little memory used
    containers = Containers(parent, [spec])
    invs = [Arrival(i, 0.0, spec.name, spec.input_size(0.1)) for i in range(5)]
    mgr = Vpa(ResourceGrid())  # 1 core x 8, 64 MB x 8
    after: dict = {}

    async def main() -> list:
        try:
            await containers.start(warm=False)
            records = await Invoker(containers, rule=mgr).replay(invs)
            lim = containers[spec.name].cg.read_limits()
            after["limits"] = (lim.cpu_quota_cores, lim.mem_limit_bytes)
            return records
        finally:
            await containers.stop()

    records = sorted(asyncio.run(main()), key=lambda r: r.start_s)
    assert all(r.outcome == "success" for r in records), records
    assert [r.kind for r in records[:3]] == ["user"] * 3  # VPA waits for 3 runs
    assert records[3].kind == "harvested" and records[3].cpu_cores == 1.0, records[3]
    assert records[3].mem_mb < 512 and records[3].mem_mb % 64 == 0
    assert all(0 <= c < 0.5 for c in mgr.cpu[spec.name])  # measured: sleepy barely uses CPU
    assert all(0 < m < 512 for m in mgr.mem[spec.name]), mgr.mem
    assert after["limits"] == (2.0, 512 * 2**20)  # the user's size after the replay
    cpu, mem = mgr.decide(spec.name)
    assert (cpu * 1.0, mem * 64.0) == (records[4].cpu_cores, records[4].mem_mb)
    assert not _exists(parent)


def test_spiky_fits_the_users_size_and_is_killed_by_a_harvest_from_its_usual_peak(
    v1_root: None,
) -> None:
    """spiky (issue 13.7): a call whose input spikes runs at the user's 256 MB; the same call
    under a hard limit sized as a harvest from its usual peak (recent peak + one 64 MB unit)
    is OOM-killed; its usual calls fit that limit."""
    from sidecar.units import MB
    from training.invoker.functions import SPIKE_MB, spikes

    parent = f"faasrm-test-invoker-{uuid.uuid4().hex[:8]}"
    containers = Containers(parent, [BY_NAME["spiky"]])
    usual, spiking = 3.0, 2.0
    assert not spikes(usual) and spikes(spiking)

    def max_usage(c) -> int:
        path = os.path.join(cgroups.DEFAULT_ROOT, "memory", c.rel, "memory.max_usage_in_bytes")
        with open(path) as f:
            return int(f.read())

    async def main() -> tuple:
        try:
            await containers.start()
            c = containers["spiky"]
            first = await c.run(usual)
            usual_peak = max_usage(c)
            at_user = await c.run(spiking)
            spike_peak = max_usage(c)
            harvest = math.ceil(usual_peak / (64 * MB) + 1) * 64 * MB  # the safeguard's least
            c.cg.write_limits(
                replace(c.user_limits, mem_limit_bytes=harvest), headroom_bytes=0, force=True
            )
            still = await c.run(usual)
            killed = await c.run(spiking)
            return first, usual_peak, at_user, spike_peak, harvest, still, killed, c.oom_kills()
        finally:
            await containers.stop()

    first, usual_peak, at_user, spike_peak, harvest, still, killed, ooms = asyncio.run(main())
    assert first[1] == at_user[1] == still[1] == "success", (first, at_user, still)
    assert usual_peak < 64 * MB and harvest == 128 * MB  # ~25 MB worker and call, 2 units
    assert harvest <= SPIKE_MB * MB < spike_peak < 256 * MB - 16 * MB  # ~5x its usual peak
    assert killed[1] == "oom" and ooms == 1, killed


def test_a_failed_start_leaves_no_other_container_starting(v1_root: None) -> None:
    """One container failing to start must not leave the others' starts running past the
    caller's cleanup (they would create a cgroup and a worker after ``stop()``)."""
    parent = f"faasrm-test-invoker-{uuid.uuid4().hex[:8]}"
    bad = replace(BY_NAME["sleepy"], mem_mb=1.0)  # 1 MB -> a CPU quota the kernel refuses
    containers = Containers(parent, [BY_NAME["pyloop"], bad])

    async def main() -> tuple[BaseException | None, list]:
        err = None
        try:
            await containers.start(warm=False)
        except ValueError as exc:
            err = exc
        finally:
            await containers.stop()
        await asyncio.sleep(3)  # time for a start still running to make its worker
        c = containers["pyloop"]
        live = c.proc is not None and c.proc.returncode is None
        if live:  # the test's own cleanup
            await c.stop()
        return err, [live, c.cg is not None]

    err, leftovers = asyncio.run(main())
    assert err is not None
    assert leftovers == [False, False]
    assert not _exists(parent)
