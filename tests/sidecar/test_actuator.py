"""The actuator: pure restore/limit rules, then real v1 cgroups and v2 fixture trees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sidecar_helpers import MB, ref, v2_container

from sidecar import cgroups
from sidecar.actuator import Actuator, Managed, restore_plan, target_limits, user_limits
from sidecar.cgroups import Limits
from sidecar.engine import USER_TARGET, Target
from sidecar.runtimes.base import UserSize

# ------------------------------------------------------------------------------ pure rules


def test_user_limits_exact_or_from_config() -> None:
    orig = Limits(None, 50_000, 100, None, 64 * MB)
    assert user_limits(UserSize(1.0, 128 * MB), orig, exact=True) == orig
    assert user_limits(UserSize(1.0, 128 * MB, 300), orig, exact=False) == Limits(
        1.0, 50_000, 300, 128 * MB, 64 * MB
    )
    held = Limits(None, 50_000, 100, None, None, mem_oom_hold=True)  # docker --oom-kill-disable
    assert user_limits(UserSize(1.0, 128 * MB), held, exact=False).mem_oom_hold


def test_target_limits_take_user_values_for_none() -> None:
    user = Limits(1.3, 50_000, 100, 300 * MB, None)
    assert target_limits(user, USER_TARGET, 100_000) == user  # exact, period included
    got = target_limits(user, Target(0.5, 40, 128 * MB, None), 100_000)
    assert got == Limits(0.5, 100_000, 40, 128 * MB, None)
    assert target_limits(user, Target(0.5, 40, None, None, 200_000), 100_000).cpu_period_us == (
        200_000
    )  # a harvest period travels with its quota
    got2 = target_limits(user, Target(None, None, None, 96 * MB, 200_000), 100_000)
    assert got2.cpu_period_us == user.cpu_period_us  # and only with it
    assert got2 == Limits(1.3, 50_000, 100, 300 * MB, 96 * MB)


def test_restore_plan_spares_only_live_owners() -> None:
    m = {c: Managed(c, c, 1, "/", Limits()) for c in "abc"}
    m["a"].owner, m["b"].owner = "inv-1", "inv-2"
    assert sorted(restore_plan(m, live={"inv-1"})) == ["b", "c"]
    assert sorted(restore_plan(m, live=set())) == ["a", "b", "c"]


# ------------------------------------------------------------------------------ v2 trees


def test_v2_harvest_uses_memory_high_and_restore_is_exact(tmp_path: Path) -> None:
    d = v2_container(tmp_path, "c1")
    act = Actuator(tmp_path / "state.json", 16 * MB)
    r = ref("c1", cpu=1.0, mem_mb=512, version=2, path=str(d))
    cg = cgroups.CgroupV2(str(d))
    m = act.adopt(r, cg)
    # adopt wrote the configured user size in place of the tree's 0.5 cores, and persisted it
    assert (d / "cpu.max").read_text().split() == ["100000", "100000"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["containers"]["c1"]["user"]["cpu_quota_cores"] == 1.0
    applied, took = act.apply("c1", Target(0.25, 25, None, 128 * MB), owner="inv-1")
    assert applied.mem_high_bytes == 128 * MB and took >= 0 and m.owner == "inv-1"
    assert (d / "cpu.max").read_text().split() == ["25000", "100000"]
    assert (d / "memory.high").read_text().strip() == str(128 * MB)
    assert (d / "memory.max").read_text().strip() == str(512 * MB)  # never lowered on v2
    assert act.restore("c1") == "restored" and m.owner is None
    assert (d / "memory.high").read_text().strip() == "max"
    assert (d / "cpu.max").read_text().split() == ["100000", "100000"]


def test_memory_floor_keeps_user_memory(tmp_path: Path) -> None:
    d = v2_container(tmp_path, "c1")  # memory.current ~80 MiB
    act = Actuator(tmp_path / "state.json", 16 * MB)
    act.adopt(ref("c1", cpu=1.0, mem_mb=512, version=2, path=str(d)), cgroups.CgroupV2(str(d)))
    # a hard limit of 64 MiB is below usage + headroom: refused, CPU still applied
    applied, _ = act.apply("c1", Target(0.5, None, 64 * MB, None), owner="i")
    assert applied == Target(0.5, None, None, None) and act.refused == 1
    assert (d / "memory.max").read_text().strip() == str(512 * MB)
    assert (d / "cpu.max").read_text().split()[0] == "50000"


def test_restore_pending_when_usage_exceeds_user_memory(tmp_path: Path) -> None:
    d = v2_container(tmp_path, "c1")
    act = Actuator(tmp_path / "state.json", 16 * MB)
    act.adopt(ref("c1", cpu=1.0, mem_mb=256, version=2, path=str(d)), cgroups.CgroupV2(str(d)))
    act.apply("c1", Target(2.0, None, 512 * MB, 512 * MB), owner="i")  # accelerated
    (d / "memory.current").write_text(f"{300 * MB}\n")  # using more than the user's 256
    assert act.restore("c1") == "pending"
    assert (d / "cpu.max").read_text().split()[0] == "100000"  # CPU back now
    assert (d / "memory.max").read_text().strip() == str(512 * MB)  # memory not forced
    (d / "memory.current").write_text(f"{100 * MB}\n")
    assert act.retry_restores() == {"c1": "restored"}
    assert (d / "memory.max").read_text().strip() == str(256 * MB)


def _break(path: Path) -> str:
    """A cgroup file that fails every read and write (EISDIR), as a kernel's EIO or EBUSY would;
    returns what it held."""
    text = path.read_text()
    path.unlink()
    path.mkdir()
    return text


def _mend(path: Path, text: str) -> None:
    path.rmdir()
    path.write_text(text)


def test_a_restore_that_fails_is_retried_until_the_user_limits_are_back(tmp_path: Path) -> None:
    """A restore that hits an I/O error, or whose memory the kernel refuses and whose limits then
    cannot even be read, is left pending and retried every tick: none strands a container below
    its user's limits with no decision owning it. ``forget`` keeps such a container until it is
    restored."""
    d = v2_container(tmp_path, "c1")
    act = Actuator(tmp_path / "state.json", 16 * MB)
    m = act.adopt(ref("c1", cpu=1.0, mem_mb=256, version=2, path=str(d)), cgroups.CgroupV2(str(d)))
    act.apply("c1", Target(0.25, 25, None, 128 * MB), owner="i")
    harvested = _break(d / "cpu.max")
    assert act.restore("c1").startswith("error:")
    assert m.restore_pending and m.owner is None and "c1" in act.held
    assert act.retry_restores()["c1"].startswith("error:")  # still broken: tried again
    _mend(d / "cpu.max", harvested)
    assert act.retry_restores() == {"c1": "restored"}
    assert (d / "cpu.max").read_text().split() == ["100000", "100000"]
    assert not m.restore_pending and "c1" not in act.held
    # memory refused (usage above the user's 256 MB) and the limits unreadable: pending, no raise
    act.apply("c1", Target(2.0, None, 512 * MB, 512 * MB), owner="j")
    (d / "memory.current").write_text(f"{300 * MB}\n")
    high = _break(d / "memory.high")
    assert act.restore("c1").startswith("error:") and m.restore_pending
    _mend(d / "memory.high", high)
    assert act.retry_restores() == {"c1": "pending"}  # CPU back, memory waits for the usage
    assert (d / "cpu.max").read_text().split()[0] == "100000"
    (d / "memory.current").write_text(f"{100 * MB}\n")
    assert act.retry_restores() == {"c1": "restored"}
    # forget: a container whose restore fails stays managed, and is retried, until restored
    act.apply("c1", Target(0.25, 25, None, 128 * MB), owner="k")
    harvested = _break(d / "cpu.max")
    assert act.forget("c1").startswith("error:") and "c1" in act.managed
    assert "c1" in json.loads((tmp_path / "state.json").read_text())["containers"]
    _mend(d / "cpu.max", harvested)
    assert act.retry_restores() == {"c1": "restored"}
    assert act.forget("c1") == "restored" and "c1" not in act.managed


def test_forget_drops_a_container_whose_pending_restore_finds_it_gone(tmp_path: Path) -> None:
    """A container whose restore is pending (its memory refused) and whose cgroup is then
    removed (the container deleted): nothing is left to restore, so ``forget`` drops it from the
    state, the state file and the retries, where a failed restore would have kept it."""
    import shutil

    d = v2_container(tmp_path, "c1")
    act = Actuator(tmp_path / "state.json", 16 * MB)
    m = act.adopt(ref("c1", cpu=1.0, mem_mb=256, version=2, path=str(d)), cgroups.CgroupV2(str(d)))
    act.apply("c1", Target(2.0, None, 512 * MB, 512 * MB), owner="i")  # accelerated
    (d / "memory.current").write_text(f"{300 * MB}\n")  # above the user's 256 MB
    assert act.restore("c1") == "pending" and m.restore_pending
    shutil.rmtree(d)
    assert act.forget("c1") == "gone"
    assert "c1" not in act.managed and "c1" not in act.held
    assert json.loads((tmp_path / "state.json").read_text())["containers"] == {}
    assert act.retry_restores() == {}


def test_adopt_puts_in_place_what_the_kernel_takes_and_retries_the_rest(tmp_path: Path) -> None:
    """A container adopted with more memory in use than its user's size allows (the floor) gets
    its user's CPU at once and its memory once the usage fits: it was left half-managed, never
    written, at whatever limits it had."""
    d = v2_container(tmp_path, "c1")  # 0.5 cores, memory.current ~80 MiB
    act = Actuator(tmp_path / "state.json", 16 * MB)
    m = act.adopt(ref("c1", cpu=2.0, mem_mb=64, version=2, path=str(d)), cgroups.CgroupV2(str(d)))
    assert (d / "cpu.max").read_text().split() == ["200000", "100000"]
    assert m.restore_pending and "c1" in act.held
    (d / "memory.current").write_text(f"{40 * MB}\n")
    assert act.retry_restores() == {"c1": "restored"}
    assert (d / "memory.max").read_text().strip() == str(64 * MB)


def test_recover_restores_state_file_containers_and_drops_gone(tmp_path: Path) -> None:
    d1, d2 = v2_container(tmp_path, "c1"), v2_container(tmp_path, "c2")
    state = tmp_path / "state.json"
    act = Actuator(state, 16 * MB)
    for name, d in (("c1", d1), ("c2", d2)):
        act.adopt(ref(name, cpu=1.0, mem_mb=512, version=2, path=str(d)), cgroups.CgroupV2(str(d)))
        act.apply(name, Target(0.25, 25, None, 128 * MB), owner="x")
    # "crash": a new actuator finds the harvested limits and the state file
    import shutil

    shutil.rmtree(d2)
    act2 = Actuator(state, 16 * MB)
    assert act2.recover() == {"c1": "restored", "c2": "gone"}
    assert (d1 / "cpu.max").read_text().split() == ["100000", "100000"]
    assert (d1 / "memory.high").read_text().strip() == "max"
    assert list(json.loads(state.read_text())["containers"]) == ["c1"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_size_configured_while_the_node_was_down_wins_at_the_restart(tmp_path: Path) -> None:
    """Recovery restores the size saved before a crash; the configured size the node starts with
    (changed while it was down) then replaces it, as on a reload, since the engine decides
    against it. A size the kernel would refuse keeps the saved one."""
    d = v2_container(tmp_path, "c1")
    state = tmp_path / "state.json"
    act = Actuator(state, 16 * MB)
    act.adopt(ref("c1", cpu=1.0, mem_mb=512, version=2, path=str(d)), cgroups.CgroupV2(str(d)))
    act.apply("c1", Target(0.25, 25, None, 128 * MB), owner="x")
    act2 = Actuator(state, 16 * MB)  # "crash", then a restart with the size raised to 2 cores
    assert act2.recover() == {"c1": "restored"}
    assert (d / "cpu.max").read_text().split() == ["100000", "100000"]
    m = act2.adopt(ref("c1", cpu=2.0, mem_mb=512, version=2, path=str(d)))
    assert m.user.cpu_quota_cores == 2.0 and not m.restore_pending
    assert (d / "cpu.max").read_text().split() == ["200000", "100000"]
    assert json.loads(state.read_text())["containers"]["c1"]["user"]["cpu_quota_cores"] == 2.0
    act3 = Actuator(state, 16 * MB)
    act3.recover()
    assert act3.adopt(ref("c1", cpu=0.001, mem_mb=512, version=2, path=str(d))).user == m.user


def test_unreadable_state_file_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable state file"):
        Actuator(p, 0).recover()
    p.write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="unknown version"):
        Actuator(p, 0).recover()


def test_vanished_container_mid_write(tmp_path: Path) -> None:
    import shutil

    d = v2_container(tmp_path, "c1")
    act = Actuator(tmp_path / "state.json", 16 * MB)
    act.adopt(ref("c1", cpu=1.0, mem_mb=512, version=2, path=str(d)), cgroups.CgroupV2(str(d)))
    shutil.rmtree(d)
    with pytest.raises(cgroups.CgroupGone):
        act.apply("c1", Target(0.5, None, None, None), owner="i")
    assert act.forget("c1") == "gone"
    assert json.loads((tmp_path / "state.json").read_text())["containers"] == {}


# ------------------------------------------------------------------------------ real v1


def test_real_v1_harvest_restore_and_floor(v1_cgroup, spawn, tmp_path: Path) -> None:
    rel = v1_cgroup.rel_path
    act = Actuator(tmp_path / "state.json", 16 * MB)
    # a process holding ~60 MB
    p = spawn(
        "import sys; b = bytearray(60 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
        "print('ok', flush=True); sys.stdin.read()"
    )
    assert p.stdout.readline().strip() == "ok"
    r = ref(rel, cpu=1.5, mem_mb=256, version=1, path=rel)
    act.adopt(r, v1_cgroup)
    cpu_dir, mem_dir = v1_cgroup.paths[0], v1_cgroup.paths[2]

    def read(d: str, f: str) -> int:
        return int(Path(d, f).read_text())

    assert read(cpu_dir, "cpu.cfs_quota_us") == 150_000
    assert read(mem_dir, "memory.limit_in_bytes") == 256 * MB
    applied, _ = act.apply(rel, Target(0.5, 33, 128 * MB, None), owner="i")
    assert applied.mem_limit_bytes == 128 * MB
    assert read(cpu_dir, "cpu.cfs_quota_us") == 50_000 and read(cpu_dir, "cpu.shares") == 338
    assert read(mem_dir, "memory.limit_in_bytes") == 128 * MB
    # 64 MB would be below usage (~60 MB + interpreter) + 16 MB headroom: refused, no OOM kill
    applied, _ = act.apply(rel, Target(0.5, 33, 64 * MB, None), owner="i")
    assert applied.mem_limit_bytes is None
    assert read(mem_dir, "memory.limit_in_bytes") == 256 * MB
    assert act.restore(rel) == "restored"
    assert read(cpu_dir, "cpu.cfs_quota_us") == 150_000 and read(cpu_dir, "cpu.shares") == 1024
    assert p.poll() is None
    assert "oom_kill 0" in Path(mem_dir, "memory.oom_control").read_text()
    assert os.path.exists(tmp_path / "state.json")


def test_real_v1_oom_hold_only_while_a_decision_holds_memory_below_the_user(
    v1_cgroup, tmp_path: Path
) -> None:
    """``oom_hold``: oom_kill_disable is set with a harvested hard limit only, not with more
    memory than the user's, and lifted by a restore, by a give-back of the memory (a target
    without it) and when the decision is released with its limits left in place."""
    rel = v1_cgroup.rel_path
    act = Actuator(tmp_path / "state.json", 16 * MB, oom_hold=True)
    act.adopt(ref(rel, cpu=1.0, mem_mb=256, version=1, path=rel), v1_cgroup)

    def hold() -> bool:
        return v1_cgroup.read_limits().mem_oom_hold

    assert not hold()
    act.apply(rel, Target(0.5, None, 128 * MB, None), owner="i")
    assert hold()
    act.apply(rel, Target(0.5, None, None, None), owner="i")  # memory given back
    assert not hold() and v1_cgroup.read_limits().mem_limit_bytes == 256 * MB
    act.apply(rel, Target(2.0, None, 512 * MB, None), owner="j")  # accelerated: no hold
    assert not hold()
    act.apply(rel, Target(0.5, None, 128 * MB, None), owner="k")
    assert act.restore(rel) == "restored" and not hold()
    act.apply(rel, Target(0.5, None, 128 * MB, None), owner="l")
    act.release(rel)  # restore_on_end = false: the harvest stays, nobody would wake a waiter
    assert not hold() and v1_cgroup.read_limits().mem_limit_bytes == 128 * MB
    act.apply(rel, Target(0.5, None, 128 * MB, None), owner="crashed")
    assert hold()
    assert Actuator(tmp_path / "state.json", 16 * MB).recover() == {rel: "restored"}  # a restart
    assert not hold() and v1_cgroup.read_limits().mem_limit_bytes == 256 * MB
    plain = Actuator(tmp_path / "state2.json", 16 * MB)  # the default: "hard"
    plain.adopt(ref(rel, cpu=1.0, mem_mb=256, version=1, path=rel), v1_cgroup)
    plain.apply(rel, Target(0.5, None, 128 * MB, None), owner="m")
    assert not hold()


def test_sidecar_restore_command_puts_a_crashed_nodes_containers_back(
    v1_cgroup, tmp_path: Path
) -> None:
    """``faasrm sidecar restore`` (the unit's ExecStopPost): a harvest and its OOM hold left
    behind by a daemon that died are undone at once, and a second run finds nothing to do."""
    rel = v1_cgroup.rel_path
    state = tmp_path / "state.json"
    act = Actuator(state, 16 * MB, oom_hold=True)
    act.adopt(ref(rel, cpu=1.0, mem_mb=256, version=1, path=rel), v1_cgroup)
    act.apply(rel, Target(0.25, None, 128 * MB, None), owner="i")  # then the daemon "dies"
    assert v1_cgroup.read_limits().mem_oom_hold

    def restore() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "sidecar", "sidecar", "restore", "--state-file", str(state)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    done = restore()
    assert done.returncode == 0 and json.loads(done.stdout) == {rel: "restored"}, done.stderr
    limits = v1_cgroup.read_limits()
    assert limits.cpu_quota_cores == 1.0 and limits.mem_limit_bytes == 256 * MB
    assert not limits.mem_oom_hold
    again = restore()  # idempotent: the container is at its user's limits already
    assert again.returncode == 0 and json.loads(again.stdout) == {rel: "restored"}


def test_a_config_that_does_not_load_still_restores_a_crashed_nodes_containers(
    v1_cgroup, tmp_path: Path
) -> None:
    """A bad edit of the config, then a crash: ExecStopPost's restore and every restart fail on
    the config, and a harvest left behind would stay with nothing deciding for it. Both commands
    still restore from the state file the config names, then report the error (exit 2)."""
    rel = v1_cgroup.rel_path
    state = tmp_path / "state.json"
    bad = tmp_path / "sidecar.toml"
    bad.write_text(f"[actuation]\nstate_file = '{state}'\n[sampler]\ntick_s = 99.0\n")
    for command in ("restore", "run"):
        act = Actuator(state, 16 * MB, oom_hold=True)
        act.adopt(ref(rel, cpu=1.0, mem_mb=256, version=1, path=rel), v1_cgroup)
        act.apply(rel, Target(0.25, None, 128 * MB, None), owner="i")  # then the daemon "dies"
        argv = [sys.executable, "-m", "sidecar", "sidecar", command, "--config", str(bad)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "sampler.tick_s 99.0" in done.stderr, done
        limits = v1_cgroup.read_limits()
        assert limits.cpu_quota_cores == 1.0 and limits.mem_limit_bytes == 256 * MB, command
        assert not limits.mem_oom_hold
