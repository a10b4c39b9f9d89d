"""Tests for sidecar.cgroups: real v1 cgroups (root only) and v2 against a file-tree fixture."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sidecar import cgroups
from sidecar.cgroups import (
    CgroupGone,
    CgroupIOError,
    CgroupV1,
    CgroupV2,
    Limits,
    shares_to_weight,
    weight_to_shares,
)
from sidecar.units import MB as MiB

BUSY = "while True: pass"
# Prints "ready", then per line on stdin allocates (and touches) that many MiB, printing "ok".
ALLOC = """
import sys
print("ready", flush=True)
held = []
for line in sys.stdin:
    held.append(b"x" * (int(line) << 20))
    print("ok", flush=True)
"""


def _file(cg: CgroupV1, name: str) -> str:
    return Path(cg._p(name)).read_text().strip()


def _started(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _allocate(proc: subprocess.Popen[str], mib: int) -> bool:
    """Ask an ALLOC process for mib more MiB; False if it died (OOM-killed) instead."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(f"{mib}\n")
        proc.stdin.flush()
    except BrokenPipeError:
        return False
    return proc.stdout.readline().strip() == "ok"


# --------------------------------------------------------------------------- pure mapping


def test_weight_shares_defaults_correspond() -> None:
    assert weight_to_shares(100) == 1024
    assert shares_to_weight(1024) == 100


def test_weight_to_shares_round_trips_every_weight() -> None:
    assert all(shares_to_weight(weight_to_shares(w)) == w for w in range(1, 10_001))


def test_shares_outside_weight_range_clamp() -> None:
    assert shares_to_weight(2) == 1
    assert shares_to_weight(262_144) == 10_000
    assert weight_to_shares(1) == 10 and weight_to_shares(10_000) == 102_400


@pytest.mark.parametrize(
    "bad",
    [
        Limits(cpu_weight=0),
        Limits(cpu_weight=10_001),
        Limits(cpu_quota_cores=0.005),  # 500 us per 100 ms period: below the kernel's 1000 us
        Limits(cpu_period_us=500),
        Limits(mem_limit_bytes=0),
        Limits(mem_high_bytes=-5),
    ],
)
def test_invalid_limits_are_refused_before_any_write(v2_tree: Path, bad: Limits) -> None:
    cg = CgroupV2(str(v2_tree))
    with pytest.raises(ValueError):
        cg.write_limits(bad, headroom_bytes=0)
    assert cg.writes == 0


# --------------------------------------------------------------------------- v2 (fixture tree)


def test_v2_read_usage_parses_fixture(v2_tree: Path) -> None:
    with CgroupV2(str(v2_tree)) as cg:
        before = time.monotonic()
        u = cg.read_usage()
    assert before <= u.t_s <= time.monotonic()
    assert u.cpu_usage_s == pytest.approx(8.123456)
    assert (u.nr_periods, u.nr_throttled) == (1875, 212)
    assert u.throttled_s == pytest.approx(4.321987)
    assert u.mem_bytes == 84_279_296
    assert u.mem_peak_bytes == 127_926_272
    assert u.oom_kills == 1
    assert u.mem_pressure_some_avg10 == pytest.approx(1.53)


def test_v2_read_limits_parses_fixture(v2_tree: Path) -> None:
    with CgroupV2(str(v2_tree)) as cg:
        assert cg.read_limits() == Limits(
            cpu_quota_cores=0.5,
            cpu_period_us=100_000,
            cpu_weight=100,
            mem_limit_bytes=512 * MiB,
            mem_high_bytes=None,
        )


def test_v2_max_parses_to_none(v2_tree: Path) -> None:
    (v2_tree / "cpu.max").write_text("max 100000\n")
    (v2_tree / "memory.max").write_text("max\n")
    lim = CgroupV2(str(v2_tree)).read_limits()
    assert lim.cpu_quota_cores is None and lim.cpu_period_us == 100_000
    assert lim.mem_limit_bytes is None and lim.mem_high_bytes is None


def test_v2_write_limits_formats(v2_tree: Path) -> None:
    cg = CgroupV2(str(v2_tree))
    cg.write_limits(
        Limits(
            cpu_quota_cores=0.25,
            cpu_period_us=100_000,
            cpu_weight=200,
            mem_limit_bytes=256 * MiB,
            mem_high_bytes=192 * MiB,
        ),
        headroom_bytes=32 * MiB,
    )
    assert (v2_tree / "cpu.max").read_text() == "25000 100000\n"
    assert (v2_tree / "cpu.weight").read_text() == "200\n"
    assert (v2_tree / "memory.max").read_text() == f"{256 * MiB}\n"
    assert (v2_tree / "memory.high").read_text() == f"{192 * MiB}\n"
    assert cg.writes == 4
    cg.write_limits(Limits(), headroom_bytes=0)  # back to unlimited
    assert (v2_tree / "cpu.max").read_text() == "max 100000\n"
    assert (v2_tree / "cpu.weight").read_text() == "100\n"
    assert (v2_tree / "memory.max").read_text() == "max\n"
    assert (v2_tree / "memory.high").read_text() == "max\n"
    assert cg.read_limits() == Limits()


def test_v2_write_limits_writes_only_changes(v2_tree: Path) -> None:
    cg = CgroupV2(str(v2_tree))
    current = cg.read_limits()
    cg.write_limits(current, headroom_bytes=0)
    assert cg.writes == 0
    cg.write_limits(replace(current, cpu_weight=300), headroom_bytes=0)
    assert cg.writes == 1
    cg.write_limits(replace(current, cpu_weight=300, cpu_period_us=50_000), headroom_bytes=0)
    assert cg.writes == 2  # cpu.max carries quota and period together
    assert (v2_tree / "cpu.max").read_text() == "25000 50000\n"  # 0.5 cores at the new period


def _record_writes(cg: cgroups.Cgroup, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    order: list[str] = []
    real = cg._write

    def write(path: str, value: str) -> None:
        order.append(os.path.basename(path))
        real(path, value)

    monkeypatch.setattr(cg, "_write", write)
    return order


def test_v2_raising_memory_is_written_first(v2_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cg = CgroupV2(str(v2_tree))
    old = cg.read_limits()
    order = _record_writes(cg, monkeypatch)
    new = replace(
        old,
        cpu_quota_cores=2.0,
        cpu_weight=400,
        mem_limit_bytes=1024 * MiB,
        mem_high_bytes=900 * MiB,
    )
    cg.write_limits(new, headroom_bytes=0)
    assert order == ["memory.max", "cpu.max", "cpu.weight", "memory.high"]


def test_v2_lowering_memory_is_checked_then_written_last(
    v2_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cg = CgroupV2(str(v2_tree))  # memory.current is ~80.4 MiB
    old = cg.read_limits()
    order = _record_writes(cg, monkeypatch)
    cg.write_limits(
        replace(old, cpu_quota_cores=0.1, mem_limit_bytes=128 * MiB), headroom_bytes=32 * MiB
    )
    assert order == ["cpu.max", "memory.max"]
    assert (v2_tree / "memory.max").read_text() == f"{128 * MiB}\n"


def test_v2_hard_limit_below_usage_plus_headroom_is_refused(v2_tree: Path) -> None:
    cg = CgroupV2(str(v2_tree))
    before = {f: (v2_tree / f).read_text() for f in ("cpu.max", "memory.max", "memory.high")}
    with pytest.raises(ValueError, match="usage 84279296"):
        cg.write_limits(
            Limits(cpu_quota_cores=1.0, mem_limit_bytes=96 * MiB), headroom_bytes=32 * MiB
        )
    assert cg.writes == 0
    assert before == {f: (v2_tree / f).read_text() for f in before}
    cg.write_limits(Limits(mem_limit_bytes=96 * MiB), headroom_bytes=32 * MiB, force=True)
    assert (v2_tree / "memory.max").read_text() == f"{96 * MiB}\n"


def test_v2_rereads_through_kept_fd(v2_tree: Path) -> None:
    cg = CgroupV2(str(v2_tree))
    assert cg.read_usage().mem_bytes == 84_279_296
    fd = cg._fds[str(v2_tree / "memory.current")]
    (v2_tree / "memory.current").write_text("90000000\n")  # same inode, new content
    assert cg.read_usage().mem_bytes == 90_000_000
    assert cg._fds[str(v2_tree / "memory.current")] == fd


def test_v2_reopens_after_ebadf(v2_tree: Path) -> None:
    cg = CgroupV2(str(v2_tree))
    cg.read_usage()
    os.close(cg._fds[str(v2_tree / "memory.current")])  # someone closed our fd
    assert cg.read_usage().mem_bytes == 84_279_296


def test_v2_missing_file_names_it(v2_tree: Path) -> None:
    (v2_tree / "memory.events").unlink()
    with pytest.raises(CgroupIOError, match="memory.events") as info:
        CgroupV2(str(v2_tree)).read_usage()
    assert info.value.path == str(v2_tree / "memory.events")


def test_v2_removed_directory_is_gone(v2_tree: Path) -> None:
    cg = CgroupV2(str(v2_tree))
    cg.read_usage()
    cg.close()
    for f in v2_tree.iterdir():
        f.unlink()
    v2_tree.rmdir()
    with pytest.raises(CgroupGone, match="cpu.stat"):
        cg.read_usage()
    with pytest.raises(CgroupGone):
        cg.read_limits()
    with pytest.raises(CgroupGone):
        cg.write_limits(Limits(cpu_weight=50), headroom_bytes=0)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("memory.current", "abc\n"),
        ("memory.current", ""),
        ("cpu.stat", "user_usec 1\nsystem_usec 2\n"),  # no usage_usec
        ("cpu.stat", "usage_usec 12 34\n"),
        ("cpu.stat", "usage_usec\n"),
        ("memory.events", "oom_kill\n"),
        ("memory.events", "oom_kill many\n"),
        ("memory.pressure", "some avg10=x avg60=0.00\n"),
        ("memory.pressure", "garbage\n"),
        ("memory.peak", "12.5\n"),
    ],
)
def test_v2_malformed_usage_file(v2_tree: Path, name: str, content: str) -> None:
    (v2_tree / name).write_text(content)
    with pytest.raises(CgroupIOError, match=name.replace(".", r"\.")):
        CgroupV2(str(v2_tree)).read_usage()


@pytest.mark.parametrize(
    ("name", "content"),
    [("cpu.max", "25000\n"), ("cpu.max", "lots 100000\n"), ("memory.high", "1G\n")],
)
def test_v2_malformed_limits_file(v2_tree: Path, name: str, content: str) -> None:
    (v2_tree / name).write_text(content)
    with pytest.raises(CgroupIOError, match=name.replace(".", r"\.")):
        CgroupV2(str(v2_tree)).read_limits()


def test_v2_without_cpu_controller_or_psi(v2_tree: Path) -> None:
    (v2_tree / "cpu.stat").write_text("usage_usec 500000\nuser_usec 400000\nsystem_usec 100000\n")
    (v2_tree / "memory.pressure").unlink()
    u = CgroupV2(str(v2_tree)).read_usage()
    assert u.cpu_usage_s == pytest.approx(0.5)
    assert (u.nr_throttled, u.throttled_s, u.mem_pressure_some_avg10) == (0, 0.0, None)
    assert u.nr_periods == 0


def test_v2_absent_peak_reads_minus_one(v2_tree: Path) -> None:
    (v2_tree / "memory.peak").unlink()
    cg = CgroupV2(str(v2_tree))
    assert cg.read_usage().mem_peak_bytes == -1
    cg.reset_peak()  # nothing to reset
    assert cg.read_usage().mem_peak_bytes == -1


def test_v2_reset_peak_writes_through_the_read_fd(v2_tree: Path) -> None:
    cg = CgroupV2(str(v2_tree))
    assert cg.read_usage().mem_peak_bytes == 127_926_272
    cg.reset_peak()
    assert (v2_tree / "memory.peak").read_bytes().startswith(b"reset\n")
    # Play the kernel: after the reset, reads through that fd report the new window's peak.
    (v2_tree / "memory.peak").write_text("84279296\n")
    assert cg.read_usage().mem_peak_bytes == 84_279_296


def test_v2_reset_peak_falls_back_to_software(
    v2_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def old_kernel_open(path: str, flags: int, *args: int) -> int:
        if str(path).endswith("memory.peak") and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied", path)  # kernels < 6.12
        return real_open(path, flags, *args)

    monkeypatch.setattr(cgroups.os, "open", old_kernel_open)
    cg = CgroupV2(str(v2_tree))
    cg.reset_peak()  # kernel all-time peak 122 MiB, current ~80 MiB
    assert cg.read_usage().mem_peak_bytes == 84_279_296
    (v2_tree / "memory.current").write_text("100000000\n")
    assert cg.read_usage().mem_peak_bytes == 100_000_000
    (v2_tree / "memory.current").write_text("50000000\n")
    assert cg.read_usage().mem_peak_bytes == 100_000_000  # the max since the reset
    (v2_tree / "memory.peak").write_text("200000000\n")  # a new all-time peak: exact
    assert cg.read_usage().mem_peak_bytes == 200_000_000
    assert cg.writes == 0


def test_v2_pids(v2_tree: Path) -> None:
    assert CgroupV2(str(v2_tree)).pids() == [4242, 4263]


def test_detect_version_and_open(tmp_path: Path, v2_tree: Path) -> None:
    pure = tmp_path / "pure"
    pure.mkdir()
    (pure / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    assert cgroups.detect_version(str(pure)) == 2
    cg = cgroups.open_cgroup("system.slice/x.scope", str(pure))
    assert isinstance(cg, CgroupV2) and cg.path == str(pure / "system.slice/x.scope")

    hybrid = tmp_path / "hybrid"
    for controller in ("cpu", "cpuacct", "memory", "unified"):
        (hybrid / controller).mkdir(parents=True)
        (hybrid / controller / "cgroup.procs").write_text("1\n")
    (hybrid / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    assert cgroups.detect_version(str(hybrid)) == 1
    cg = cgroups.open_cgroup("docker/abc", str(hybrid))
    assert isinstance(cg, CgroupV1) and cg.paths[0] == str(hybrid / "cpu" / "docker/abc")

    (hybrid / "unified" / "cgroup.controllers").write_text("cpu memory pids\n")
    cg = cgroups.open_cgroup("docker/abc", str(hybrid))
    assert isinstance(cg, CgroupV2) and cg.path == str(hybrid / "unified" / "docker/abc")

    with pytest.raises(cgroups.CgroupError):
        cgroups.detect_version(str(tmp_path / "nothing"))


# --------------------------------------------------------------------------- v1 (real cgroups)


def test_v1_fresh_cgroup_has_default_limits(v1_cgroup: CgroupV1) -> None:
    assert v1_cgroup.read_limits() == Limits()
    u = v1_cgroup.read_usage()
    assert u.cpu_usage_s == 0 and u.oom_kills == 0 and u.mem_pressure_some_avg10 is None


def test_v1_detected_and_opened_on_this_host(v1_cgroup: CgroupV1) -> None:
    # Reaching here means cpu/memory are writable v1 hierarchies, which excludes v2 for them.
    assert cgroups.detect_version(v1_cgroup.root) == 1
    with cgroups.open_cgroup(v1_cgroup.rel_path, v1_cgroup.root) as cg:
        assert isinstance(cg, CgroupV1) and cg.paths == v1_cgroup.paths
        assert cg.read_limits() == Limits()


def test_v1_busy_process_accumulates_cpu(v1_cgroup: CgroupV1, spawn) -> None:
    proc = spawn(BUSY)
    assert proc.pid in v1_cgroup.pids()
    u0 = v1_cgroup.read_usage()
    time.sleep(0.5)
    u1 = v1_cgroup.read_usage()
    assert u1.cpu_usage_s - u0.cpu_usage_s > 0.02  # any real share of a core, even on a busy host
    assert u1.t_s - u0.t_s >= 0.5


def test_v1_quota_limits_cpu_and_throttles(v1_cgroup: CgroupV1, spawn) -> None:
    cg = v1_cgroup
    spawn(BUSY)
    limited = Limits(cpu_quota_cores=0.2, cpu_period_us=100_000)
    start = cg.read_usage()
    cg.write_limits(limited, headroom_bytes=0)
    assert _file(cg, "cpu.cfs_quota_us") == "20000"
    time.sleep(0.2)  # the period that was running when the quota arrived is over
    u0 = cg.read_usage()
    time.sleep(1.0)
    u1 = cg.read_usage()
    rate = (u1.cpu_usage_s - u0.cpu_usage_s) / (u1.t_s - u0.t_s)
    assert 0.01 < rate < 0.35, rate  # quota 0.2 core; the upper bound holds at any host load
    assert u1.nr_throttled > start.nr_throttled
    assert u1.throttled_s > start.throttled_s

    cg.write_limits(replace(limited, cpu_quota_cores=None), headroom_bytes=0)
    assert _file(cg, "cpu.cfs_quota_us") == "-1"
    assert cg.read_limits().cpu_quota_cores is None
    time.sleep(0.15)  # let a period that was in flight finish
    u2 = cg.read_usage()
    time.sleep(0.3)
    u3 = cg.read_usage()
    assert u3.nr_throttled == u2.nr_throttled  # unlimited: never throttled again
    assert u3.cpu_usage_s > u2.cpu_usage_s


def test_v1_throttling_counters_on_request_between_slow_reads(v1_cgroup: CgroupV1, spawn) -> None:
    """A fast read reuses the throttling counters of the last full one unless ``throttling``
    asks for cpu.stat (the throttle give-back reads it every tick for harvested quotas)."""
    cg = v1_cgroup
    spawn(BUSY)
    cg.write_limits(Limits(cpu_quota_cores=0.1, cpu_period_us=10_000), headroom_bytes=0)
    full = cg.read_usage()
    time.sleep(0.3)  # ~30 periods of 10 ms, every one throttled
    stale = cg.read_usage(oom=False, slow=False)
    assert (stale.nr_periods, stale.nr_throttled) == (full.nr_periods, full.nr_throttled)
    fresh = cg.read_usage(oom=False, slow=False, throttling=True)
    assert fresh.nr_periods >= full.nr_periods + 10
    assert fresh.nr_throttled - full.nr_throttled >= 0.5 * (fresh.nr_periods - full.nr_periods)
    assert fresh.mem_peak_bytes >= fresh.mem_bytes  # the peak is still the slow read's


def test_v1_writes_only_changed_values(v1_cgroup: CgroupV1) -> None:
    cg = v1_cgroup
    cg.write_limits(Limits(), headroom_bytes=0)  # reads the defaults: nothing to write
    assert cg.writes == 0
    cg.write_limits(Limits(cpu_weight=50), headroom_bytes=0)
    assert cg.writes == 1 and _file(cg, "cpu.shares") == "512"
    lim = Limits(cpu_weight=50, cpu_quota_cores=1.5)
    cg.write_limits(lim, headroom_bytes=0)
    assert cg.writes == 2 and _file(cg, "cpu.cfs_quota_us") == "150000"
    lim = replace(lim, cpu_period_us=50_000)
    cg.write_limits(lim, headroom_bytes=0)
    assert cg.writes == 4  # period, then the quota that keeps 1.5 cores
    assert (_file(cg, "cpu.cfs_period_us"), _file(cg, "cpu.cfs_quota_us")) == ("50000", "75000")
    lim = replace(lim, mem_limit_bytes=256 * MiB, mem_high_bytes=128 * MiB)
    cg.write_limits(lim, headroom_bytes=16 * MiB)
    assert cg.writes == 6
    cg.write_limits(lim, headroom_bytes=16 * MiB)
    assert cg.writes == 6
    assert cg.read_limits() == lim  # shares 512 <-> weight 50; page-aligned bytes read back


def test_v1_memory_usage_and_peak_reset(v1_cgroup: CgroupV1, spawn) -> None:
    cg = v1_cgroup
    proc = _started(spawn(ALLOC))
    assert _allocate(proc, 50)
    u = cg.read_usage()
    assert u.mem_bytes >= 50 * MiB
    assert u.mem_peak_bytes >= u.mem_bytes
    proc.kill()
    proc.wait(timeout=5)
    assert cg.read_usage().mem_peak_bytes >= 50 * MiB  # the peak outlives the process
    cg.reset_peak()
    assert cg.read_usage().mem_peak_bytes < 50 * MiB


def test_v1_hard_limit_below_usage_is_refused(v1_cgroup: CgroupV1, spawn) -> None:
    cg = v1_cgroup
    proc = _started(spawn(ALLOC))
    assert _allocate(proc, 50)
    usage = cg.read_usage().mem_bytes
    with pytest.raises(ValueError, match="refusing memory limit"):
        cg.write_limits(
            Limits(cpu_quota_cores=0.5, mem_limit_bytes=usage + 8 * MiB), headroom_bytes=32 * MiB
        )
    assert cg.writes == 0
    assert _file(cg, "cpu.cfs_quota_us") == "-1"
    assert int(_file(cg, "memory.limit_in_bytes")) >= 2**62
    cg.write_limits(Limits(mem_limit_bytes=usage + 64 * MiB), headroom_bytes=32 * MiB)
    assert cg.read_limits().mem_limit_bytes is not None
    assert proc.poll() is None


def test_v1_forced_limit_below_usage_fails_busy(v1_cgroup: CgroupV1, spawn) -> None:
    cg = v1_cgroup
    proc = _started(spawn(ALLOC))
    assert _allocate(proc, 50)
    # Without swap the kernel cannot reclaim anonymous memory: it answers EBUSY, kills nobody.
    with pytest.raises(CgroupIOError, match="memory.limit_in_bytes.*EBUSY"):
        cg.write_limits(Limits(mem_limit_bytes=16 * MiB), headroom_bytes=0, force=True)
    assert proc.poll() is None
    assert cg.read_limits().mem_limit_bytes is None


def test_v1_limit_below_working_set_oom_kills(v1_cgroup: CgroupV1, spawn) -> None:
    cg = v1_cgroup
    proc = _started(spawn(ALLOC))
    before = cg.read_usage()
    assert before.oom_kills == 0
    cg.write_limits(Limits(mem_limit_bytes=before.mem_bytes + 16 * MiB), headroom_bytes=8 * MiB)
    assert not _allocate(proc, 48)
    assert proc.wait(timeout=5) == -9  # SIGKILL from the OOM killer
    assert cg.read_usage().oom_kills >= 1


def test_v1_oom_hold_makes_a_task_wait_at_the_limit_until_it_is_raised(
    v1_cgroup: CgroupV1, spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mem_oom_hold``: the task that outgrows the hard limit waits (under_oom, no kill) and runs
    on when the limit is raised. The hold goes on before the limit comes down and off only after
    it went up, so the write that lifts it never kills the waiting task."""
    cg = v1_cgroup
    proc = _started(spawn(ALLOC))
    before = cg.read_usage()
    order = _record_writes(cg, monkeypatch)
    low = Limits(mem_limit_bytes=before.mem_bytes + 16 * MiB, mem_oom_hold=True)
    cg.write_limits(low, headroom_bytes=8 * MiB)
    assert order == ["memory.oom_control", "memory.limit_in_bytes"]
    assert cg.read_limits() == low
    assert proc.stdin is not None
    proc.stdin.write("48\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 5
    while not (u := cg.read_usage()).mem_held:
        assert proc.poll() is None and time.monotonic() < deadline, "never held"
        time.sleep(0.01)
    assert u.oom_kills == 0 and u.mem_bytes >= low.mem_limit_bytes - MiB
    del order[:]
    cg.write_limits(Limits(mem_limit_bytes=256 * MiB), headroom_bytes=0)
    assert order == ["memory.limit_in_bytes", "memory.oom_control"]
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ok"  # it ran on
    after = cg.read_usage()
    assert not after.mem_held and after.oom_kills == 0
    assert cg.read_limits() == Limits(mem_limit_bytes=256 * MiB)  # oom_kill_disable 0 again


def test_v1_raises_memsw_before_memory(v1_cgroup: CgroupV1) -> None:
    cg = v1_cgroup
    memsw = Path(cg._p("memory.memsw.limit_in_bytes"))
    if not memsw.exists():
        pytest.skip("no swap accounting (memory.memsw.*) on this kernel")
    Path(cg._p("memory.limit_in_bytes")).write_text(str(32 * MiB))
    memsw.write_text(str(32 * MiB))  # what docker does with --memory-swap
    cg.write_limits(Limits(mem_limit_bytes=64 * MiB), headroom_bytes=0)
    assert int(_file(cg, "memory.limit_in_bytes")) == 64 * MiB
    assert int(memsw.read_text()) == 64 * MiB
    cg.write_limits(Limits(), headroom_bytes=0)
    assert cg.read_limits().mem_limit_bytes is None


def test_v1_memsw_keeps_the_users_swap_across_harvest_and_acceleration(
    v1_cgroup: CgroupV1,
) -> None:
    """The memory+swap limit moves with the memory limit, keeping the swap the user was given
    (docker's --memory-swap minus --memory): a harvested container may not swap its way past
    its harvested box, and an accelerated one returns to its user's memsw, not to the raised
    one (the kernel wants limit <= memsw, so memsw goes up first and comes down last)."""
    cg = v1_cgroup
    memsw = Path(cg._p("memory.memsw.limit_in_bytes"))
    if not memsw.exists():
        pytest.skip("no swap accounting (memory.memsw.*) on this kernel")
    Path(cg._p("memory.limit_in_bytes")).write_text(str(256 * MiB))
    memsw.write_text(str(384 * MiB))  # the user's 256 MiB and 128 MiB of swap

    def limits() -> tuple[int, int]:
        return int(_file(cg, "memory.limit_in_bytes")), int(memsw.read_text())

    for mib in (128, 256, 512, 256):  # harvest, restore, accelerate, restore
        cg.write_limits(Limits(mem_limit_bytes=mib * MiB), headroom_bytes=0)
        assert limits() == (mib * MiB, (mib + 128) * MiB)
    cg.write_limits(Limits(), headroom_bytes=0)  # unlimited: memsw first
    assert cg.read_limits().mem_limit_bytes is None


def test_v1_removed_cgroup_is_gone(v1_cgroup: CgroupV1) -> None:
    cg = v1_cgroup
    cg.read_usage()  # fds now kept open
    cg.read_limits()
    cgroups.remove_v1(cg.rel_path, cg.root)
    assert not any(os.path.exists(p) for p in cg.paths)
    with pytest.raises(CgroupGone, match="cpuacct.usage"):
        cg.read_usage()  # kept fd: ENODEV
    with pytest.raises(CgroupGone):
        cg.read_usage()  # fresh open: ENOENT of the directory
    with pytest.raises(CgroupGone, match="cpu.shares"):
        cg.write_limits(Limits(cpu_weight=50), headroom_bytes=0)
    with pytest.raises(CgroupGone):
        cg.pids()
    cgroups.remove_v1(cg.rel_path, cg.root)  # idempotent


def test_v1_remove_moves_processes_out(v1_cgroup: CgroupV1, spawn) -> None:
    cg = v1_cgroup
    proc = _started(spawn(ALLOC))
    cgroups.remove_v1(cg.rel_path, cg.root)
    assert not any(os.path.exists(p) for p in cg.paths)
    assert proc.poll() is None  # still alive, now in the parent cgroup
    parent = os.path.join(cg.root, "memory", os.path.dirname(cg.rel_path), "cgroup.procs")
    assert str(proc.pid) in Path(parent).read_text().split()


def test_v1_invalid_value_names_file_and_value(v1_cgroup: CgroupV1) -> None:
    with pytest.raises(CgroupIOError, match=r"'abc'.*cpu\.shares.*EINVAL"):
        v1_cgroup._write(v1_cgroup._p("cpu.shares"), "abc")


# ----------------------------------------------------- v2 create/remove (fake unified mount)

PARENT, LEAF = "faasrm-real-1-fixed", "pyloop"


@pytest.fixture
def v2_root(tmp_path: Path, v2_tree: Path) -> Path:
    """A fake unified mount holding a run's parent cgroup, as the kernel would have populated
    them: the root's controllers, the parent's files, and the leaf as the fixture's directory
    (mkdir on a file tree makes an empty directory where the kernel makes the cgroup's files)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("\n")
    (root / "cgroup.procs").write_text("1\n")
    (root / PARENT).mkdir()
    (root / PARENT / "cgroup.subtree_control").write_text("\n")
    (root / PARENT / "cgroup.procs").write_text("")
    v2_tree.rename(root / PARENT / LEAF)
    return root


def test_v2_create_enables_cpu_and_memory_down_to_the_leaf(v2_root: Path) -> None:
    assert cgroups.detect_version(str(v2_root)) == 2
    leaf_control = (v2_root / PARENT / LEAF / "cgroup.subtree_control").read_text()
    cg = cgroups.create(f"{PARENT}/{LEAF}", str(v2_root))  # version detected: 2
    assert isinstance(cg, CgroupV2) and cg.path == str(v2_root / PARENT / LEAF)
    assert (v2_root / "cgroup.subtree_control").read_text() == "+cpu +memory\n"
    assert (v2_root / PARENT / "cgroup.subtree_control").read_text() == "+cpu +memory\n"
    # the leaf holds the worker: v2 forbids it to enable controllers for children
    assert (v2_root / PARENT / LEAF / "cgroup.subtree_control").read_text() == leaf_control
    assert cg.paths == cgroups.open_cgroup(f"{PARENT}/{LEAF}", str(v2_root)).paths
    cg.write_limits(
        Limits(cpu_quota_cores=0.5, cpu_weight=50, mem_limit_bytes=128 * MiB),
        headroom_bytes=0,
        force=True,
    )
    assert (v2_root / PARENT / LEAF / "cpu.max").read_text() == "50000 100000\n"
    assert (v2_root / PARENT / LEAF / "cpu.weight").read_text() == "50\n"
    assert (v2_root / PARENT / LEAF / "memory.max").read_text() == f"{128 * MiB}\n"
    assert cg.read_usage().oom_kills == 1  # memory.events' oom_kill (the invoker's OOM count)
    assert cgroups.create(f"{PARENT}/{LEAF}", str(v2_root), version=2).paths == cg.paths


def test_v2_create_without_a_unified_hierarchy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(cgroups.CgroupError, match="no unified"):
        cgroups.create_v2(f"{PARENT}/{LEAF}", str(tmp_path))


def test_v2_remove_moves_processes_to_the_parent_first(v2_root: Path) -> None:
    leaf = v2_root / PARENT / LEAF
    assert leaf.joinpath("cgroup.procs").read_text().split() == ["4242", "4263"]
    # The kernel removes a cgroup directory's files with it; a file tree cannot, so rmdir fails
    # here, after the processes were written to the parent one by one (a fake file keeps the last).
    with pytest.raises(CgroupIOError) as err:
        cgroups.remove(f"{PARENT}/{LEAF}", str(v2_root), version=2)
    assert err.value.errno == errno.ENOTEMPTY and err.value.path == str(leaf)
    assert (v2_root / PARENT / "cgroup.procs").read_text() == "4263\n"


def test_v2_remove_is_idempotent(v2_root: Path) -> None:
    cgroups.remove(f"{PARENT}/absent", str(v2_root))  # version detected: 2
    cgroups.remove_v2(f"{PARENT}/absent", str(v2_root))
