"""The cgroupfs runtime (discovery on real v1 and v2 trees) and inferred boundaries on real
cgroups."""

from __future__ import annotations

from pathlib import Path

import pytest
from sidecar_helpers import MB, v2_container

from sidecar import cgroups
from sidecar.config import BoundaryConfig, CgroupfsConfig, ContainerConfig
from sidecar.core.grid import ResourceGrid
from sidecar.core.policy import fallback_scorer
from sidecar.engine import Engine, InferredEnd, InferredStart
from sidecar.runtimes.cgroupfs import CgroupfsRuntime, function_of
from sidecar.sampler import Sampler, Ticker


def test_function_names() -> None:
    assert function_of("faasrm/thumbnail@3") == "thumbnail"
    assert function_of("a/b/resize/") == "resize"


@pytest.fixture
def v1_parent(v1_cgroup):
    """Children under the test cgroup; removed before the fixture removes the parent."""
    made: list[str] = []

    def child(name: str) -> cgroups.CgroupV1:
        rel = f"{v1_cgroup.rel_path}/{name}"
        made.append(rel)
        return cgroups.create_v1(rel)

    yield v1_cgroup.rel_path, child
    for rel in made:
        cgroups.remove_v1(rel)


def test_v1_discovery_user_sizes(v1_parent) -> None:
    parent, child = v1_parent
    a = child("resize@1")
    a.write_limits(cgroups.Limits(0.5, 100_000, 100, 128 * MB, None), headroom_bytes=0)
    child("thumb@1")
    child("listed")
    cfg = CgroupfsConfig(
        parent=parent,
        containers=[
            ContainerConfig(path=f"{parent}/listed", function="special", cpu_cores=1.0, mem_mb=64)
        ],
    )
    rt = CgroupfsRuntime(cfg, host_cores=2.0, host_mem_bytes=4096 * MB)
    assert rt.version == 1
    refs = {r.id: r for r in rt.discover()}
    assert set(refs) == {f"{parent}/listed", f"{parent}/resize@1", f"{parent}/thumb@1"}
    listed = refs[f"{parent}/listed"]
    assert (
        listed.function == "special"
        and listed.user.cpu_cores == 1.0
        and listed.user.mem_bytes == 64 * MB
    )
    assert listed.labels["user_from"] == "config" and listed.cgroup_path == f"{parent}/listed"
    resize = refs[f"{parent}/resize@1"]
    assert resize.function == "resize" and resize.labels["user_from"] == "limits"
    assert resize.user.cpu_cores == 0.5 and resize.user.mem_bytes == 128 * MB
    thumb = refs[f"{parent}/thumb@1"]  # unlimited: the host's capacity stands in for the policy
    assert thumb.user.cpu_cores == 2.0 and thumb.user.mem_bytes == 4096 * MB
    # defaults for discovered children
    rt2 = CgroupfsRuntime(
        CgroupfsConfig(parent=parent, default_cpu_cores=0.75, default_mem_mb=100), 2.0, 4096 * MB
    )
    r = {x.id: x for x in rt2.discover()}[f"{parent}/thumb@1"]
    assert r.user.cpu_cores == 0.75 and r.user.mem_bytes == 100 * MB
    # a listed container that does not exist is not reported
    rt3 = CgroupfsRuntime(
        CgroupfsConfig(containers=[ContainerConfig(path=f"{parent}/nope")]), 2.0, MB
    )
    assert rt3.discover() == []


@pytest.mark.parametrize("listed", [2, 16], ids=["stat-each", "one-scandir"])
def test_v1_relist_keeps_refs_and_sees_cgroups_come_and_go(v1_parent, listed: int) -> None:
    """The periodic relist hands back the last listing's refs (no rebuild, no limits read) and
    still sees a cgroup removed or created, whether it stats each cgroup (3 listed among 16
    siblings) or lists the parent once (17 of 16)."""
    parent, child = v1_parent
    for i in range(16):
        child(f"c{i}")
    paths = [f"{parent}/c{i}" for i in range(listed)] + [f"{parent}/later"]
    cfg = CgroupfsConfig(containers=[ContainerConfig(path=p, cpu_cores=1.0) for p in paths])
    rt = CgroupfsRuntime(cfg, 2.0, 4096 * MB)
    first = {r.id: r for r in rt.relist()}
    assert set(first) == set(paths[:-1])
    again = {r.id: r for r in rt.relist()}
    assert all(again[k] is first[k] for k in first)
    cgroups.remove_v1(f"{parent}/c1")
    child("later")
    now = {r.id: r for r in rt.relist()}
    assert set(now) == (set(paths) - {f"{parent}/c1"})
    assert now[f"{parent}/c0"] is first[f"{parent}/c0"]
    # a changed config entry is a new ref with its new size; a full discover rebuilds them all
    cfg.containers[0] = ContainerConfig(path=paths[0], cpu_cores=0.5)
    changed = {r.id: r for r in rt.relist()}[paths[0]]
    assert changed is not first[paths[0]] and changed.user.cpu_cores == 0.5
    full = {r.id: r for r in rt.discover()}
    assert set(full) == set(now) and full[f"{parent}/later"] is not now[f"{parent}/later"]


def test_v2_discovery_on_fixture_trees(tmp_path: Path) -> None:
    parent = tmp_path / "faasrm"
    parent.mkdir()
    v2_container(parent, "fn@1")
    v2_container(parent, "other@2")
    cfg = CgroupfsConfig(root=str(tmp_path), version=2, parent="faasrm")
    rt = CgroupfsRuntime(cfg, 2.0, 4096 * MB)
    refs = {r.id: r for r in rt.discover()}
    assert set(refs) == {"faasrm/fn@1", "faasrm/other@2"}
    r = refs["faasrm/fn@1"]
    assert r.cgroup_version == 2 and r.cgroup_path == str(parent / "fn@1")
    assert r.user.cpu_cores == 0.5 and r.user.mem_bytes == 512 * MB  # cpu.max / memory.max
    cg = rt.open(r)
    assert isinstance(cg, cgroups.CgroupV2) and cg.read_usage().oom_kills == 1


def test_events_never_yield_and_stop_on_close() -> None:
    import asyncio

    rt = CgroupfsRuntime(CgroupfsConfig(version=1), 2.0, MB)

    async def main() -> list:
        got = []

        async def consume() -> None:
            async for ev in rt.events():
                got.append(ev)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        rt.close()
        await asyncio.wait_for(task, 1.0)
        return got

    assert asyncio.run(main()) == []


def test_inferred_boundaries_on_a_real_busy_idle_process(v1_cgroup, spawn) -> None:
    """A process alternating ~0.3 s busy / ~0.6 s idle: each burst becomes one invocation."""
    from sidecar.runtimes.base import ContainerRef, UserSize

    rel = v1_cgroup.rel_path
    r = ContainerRef(rel, "burst", "cgroupfs", rel, 1, UserSize(1.0, 256 * MB))
    grid = ResourceGrid(0.25, 8, 64.0, 8)
    sc = fallback_scorer()
    eng = Engine(
        grid,
        node_id="n",
        host_cores=2.0,
        host_mem_mb=4096,
        scorer=lambda: (sc, "rule"),
        boundaries=BoundaryConfig(infer=True, busy_cores=0.2, idle_ticks=3),
    )
    eng.add_container(r)
    sampler = Sampler(lambda ref: cgroups.CgroupV1(ref.cgroup_path))
    sampler.track(r)
    p = spawn(
        "import time, sys\n"
        "print('go', flush=True)\n"
        "for _ in range(3):\n"
        "    t = time.monotonic()\n"
        "    while time.monotonic() - t < 0.3: pass\n"
        "    time.sleep(0.6)\n"
    )
    assert p.stdout.readline().strip() == "go"
    starts, ends = [], []

    def tick() -> None:
        for e in eng.on_samples(sampler.tick().samples):
            if isinstance(e, InferredStart):
                inv = eng.start(e.container_id, inferred=True, now_s=e.start_s - 0.1)
                eng.note_inferred_start(e.container_id, e.start_s)
                starts.append(inv.id)
            elif isinstance(e, InferredEnd):
                inv = eng.invocations[e.invocation_id]
                ends.append(eng.end(e.invocation_id, duration_s=e.end_s - inv.start_s))

    import asyncio

    asyncio.run(Ticker(0.1).run(tick, n=33))
    sampler.close()
    assert len(starts) == 3 and len(ends) == 3, (starts, [e.duration_s for e in ends])
    for e in ends:
        assert 0.1 <= e.duration_s <= 0.8  # ~0.3 s, good to a tick or two under load
        assert e.invocation.inferred and e.record["inferred"]
        assert 0.3 <= e.invocation.cpu_peak_cores <= 1.2
