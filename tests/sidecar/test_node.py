"""The node in-process over real v1 cgroups and processes: what happens to a container between two
ticks (a run killed and reported before any tick saw it, a cgroup recreated). The node's methods
are called from the test's own coroutine, so no tick or OOM wake-up runs between two calls unless
the test awaits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from daemon_helpers import write_config
from sidecar_helpers import MB, write_policy
from test_api import _client, _setup

from sidecar import cgroups, config
from sidecar.engine import UnknownContainer, effective
from sidecar.node import NODE, Node


def _metric(node: Node, name: str, **labels: str) -> float:
    return node.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_harvested_run_killed_before_any_tick_counts_one_harvested_kill(
    tmp_path: Path, boxes
) -> None:
    """The kernel kills a task of a harvested run and the invoker ends the run before a tick reads
    the kill counter: the end's own read finds the kill, so the run is an ``oom`` and the kill is
    counted then, as a harvested one. The ticks that read the counter afterwards (the OOM wake-up,
    the slow tick) count nothing more and charge the function no second failure."""
    box = boxes("oomh@1")
    cfg_path = write_config(
        tmp_path,
        0,
        {box.rel: ("fo", 1.0, 512)},
        write_policy(tmp_path / "h.onnx", "harvest"),
        actuation="v1_memory_harvest = 'hard'",
    )
    cfg = config.load(cfg_path)

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        node = client.server.app[NODE]
        try:
            first = node.start(box.rel, function="fo")  # the user's size: its usual 20 MB
            box.send("mem 20")
            box.wait_done()
            node.end(first.invocation.id)
            box.send("free")
            box.wait_done()
            res = node.start(box.rel, function="fo")
            assert res.applied and res.invocation.trace["kind"] == "harvested", res
            assert box.mem_limit() < 256 * MB
            box.send("mem 300")  # past the harvested hard limit: killed
            box.proc.wait(timeout=20)  # the loop is blocked: no tick, no OOM wake-up
            assert box.oom_kills() == 1
            ended = node.end(res.invocation.id, "failure")
            assert ended.outcome == "oom"
            assert _metric(node, "faasrm_oom_kills_total") == 1.0
            assert _metric(node, "faasrm_harvested_oom_kills_total") == 1.0
            await asyncio.sleep(1.5)  # the OOM wake-up and a slow tick read the counter
            last = node.sampler.last(box.rel)
            assert last is not None and last.oom_kills == 1  # a tick saw the kill too
            assert _metric(node, "faasrm_oom_kills_total") == 1.0
            assert _metric(node, "faasrm_harvested_oom_kills_total") == 1.0
            assert node.engine.guards["fo"].failures == 1
        finally:
            await client.close()

    asyncio.run(main())


def test_a_start_on_a_recreated_cgroup_forgets_the_old_one_and_is_refused(
    tmp_path: Path, v1_cgroup: cgroups.CgroupV1
) -> None:
    """A container restarted under the same name between two ticks: its cgroup removed and made
    again at the same path. The node's handles still point at the old one (kept files that now
    answer ENODEV, the limits last written there), so a start must not decide on them nor write
    the decision into the new cgroup: it forgets the container and answers 404 (unknown), and the
    next listing adopts the new cgroup afresh."""
    rel = f"{v1_cgroup.rel_path}/re@1"
    cgroups.create_v1(rel).close()
    cfg_path = write_config(
        tmp_path, 0, {rel: ("fr", 1.0, 256)}, write_policy(tmp_path / "h.onnx", "harvest")
    )
    cfg = config.load(cfg_path)

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        node = client.server.app[NODE]
        try:
            assert node.sampler.last(rel) is not None  # a tick read it: its files are kept open
            first = node.start(rel, function="fr")  # the user's size; the next one is harvested
            await asyncio.sleep(0.3)
            node.end(first.invocation.id)
            cgroups.remove_v1(rel)
            new = cgroups.create_v1(rel)  # the restarted container's, at the kernel's defaults
            fresh = new.read_limits()
            with pytest.raises(UnknownContainer) as refused:
                node.start(rel, function="fr")
            assert refused.value.status == 404 and "gone" in str(refused.value)
            assert new.read_limits() == fresh  # nothing written into the new cgroup
            assert rel not in node.engine.containers and rel not in node.actuator.managed
            assert node.sampler.cgroup(rel) is None
            node.sync_containers()  # the next listing: the new cgroup, at the user's size
            assert new.read_limits().cpu_quota_cores == 1.0
            assert new.read_limits().mem_limit_bytes == 256 * MB
            again = node.start(rel, function="fr")  # decided and written on the new cgroup
            cores, mem = effective(again.invocation.user, again.invocation.target)
            assert again.applied and again.invocation.trace["kind"] == "harvested"
            lim = new.read_limits()
            assert (lim.cpu_quota_cores, lim.mem_limit_bytes) == (cores, mem)
            node.end(again.invocation.id)
            new.close()
        finally:
            await client.close()
            cgroups.remove_v1(rel)

    asyncio.run(main())


def test_a_give_back_that_cannot_be_written_keeps_the_run_harvested_and_restores_later(
    tmp_path: Path,
) -> None:
    """A harvested run near its memory allocation gets its memory back, but the cgroup refuses the
    write: the run did run harvested until then, so its trace keeps the decision (and its reward),
    and the restore path owns the limits, retried every tick until the user's are back. From the
    give-back on it is counted at the user's size, CPU as well: the restore put it there."""
    cfg, cfg_path, dirs = _setup(tmp_path)
    d, cid = dirs["resize@1"], "faasrm/resize@1"
    (d / "memory.peak").unlink()  # a kernel without it: a file tree takes no peak reset

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        node = client.server.app[NODE]
        try:
            first = node.start(cid)  # the user's size: sets the baseline
            await asyncio.sleep(0.12)
            node.end(first.invocation.id)
            res = node.start(cid)
            inv = res.invocation
            assert res.applied and inv.trace["kind"] == "harvested", res
            chosen = dict(inv.trace["chosen"])
            high = int((d / "memory.high").read_text())
            assert high < 512 * MB
            (d / "memory.high").unlink()
            (d / "memory.high").mkdir()  # fails every write, as an I/O error would
            (d / "memory.current").write_text(f"{high - MB}\n")  # near it: give memory back
            for _ in range(40):
                if inv.trace["give_backs"]:
                    break
                await asyncio.sleep(0.05)
            assert [g["resources"] for g in inv.trace["give_backs"]] == [["memory"]]
            assert _metric(node, "faasrm_give_backs_total", resource="memory") == 1.0
            assert node.actuator.managed[cid].restore_pending
            (d / "memory.high").rmdir()
            (d / "memory.high").write_text(f"{high}\n")
            for _ in range(40):  # the restore the failed write left pending is retried
                if (d / "memory.high").read_text().strip() == "max":
                    break
                await asyncio.sleep(0.05)
            assert (d / "memory.high").read_text().strip() == "max"
            assert (d / "cpu.max").read_text().split() == ["200000", "100000"]
            ended = node.end(inv.id)
            assert ended.outcome == "success" and ended.reward is not None
            assert inv.trace["kind"] == "harvested" and inv.trace["chosen"] == chosen
            assert chosen["cpu_cores"] < 2.0  # harvested CPU too, which the restore gave back
            (gb,) = inv.trace["give_backs"]
            assert (gb["new_cpu_cores"], gb["new_mem_bytes"]) == (2.0, 512 * MB)
            at, dur = gb["after_s"], ended.duration_s
            held = inv.trace["held_core_s"], inv.trace["held_mb_s"]
            assert held == pytest.approx(
                (
                    chosen["cpu_cores"] * at + 2.0 * (dur - at),
                    chosen["mem_bytes"] / MB * at + 512.0 * (dur - at),
                ),
                abs=1e-5,
            )
            assert inv.trace["applied"] is True
        finally:
            await client.close()

    asyncio.run(main())
