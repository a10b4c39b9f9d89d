"""The sampler (windows, gone and unreadable containers) and the monotonic ticker."""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from pathlib import Path

import pytest
from sidecar_helpers import MB, ref, v2_container

from sidecar import cgroups
from sidecar.sampler import HISTORY, Sampler, Ticker


def _v2_sampler(
    tmp_path: Path, *names: str, slow_every: int = 10
) -> tuple[Sampler, dict[str, Path]]:
    dirs = {n: v2_container(tmp_path, n) for n in names}
    s = Sampler(lambda r: cgroups.CgroupV2(r.cgroup_path), slow_every)
    for n, d in dirs.items():
        s.track(ref(n, version=2, path=str(d)))
    return s, dirs


def test_windows_rates_and_deltas_on_v2_trees(tmp_path: Path) -> None:
    s, dirs = _v2_sampler(tmp_path, "a")
    (first,) = s.tick().samples
    assert math.isnan(first.cpu_cores) and first.oom_kills == 1 and first.oom_delta == 0
    assert first.mem_bytes == 84279296 and first.mem_pressure == 1.53
    d = dirs["a"]
    stat = (d / "cpu.stat").read_text().replace("usage_usec 8123456", "usage_usec 9123456")
    stat = stat.replace("nr_throttled 212", "nr_throttled 215")
    (d / "cpu.stat").write_text(stat)
    (d / "memory.events").write_text(
        (d / "memory.events").read_text().replace("oom_kill 1", "oom_kill 3")
    )
    res = s.tick()
    (second,) = res.samples
    dt = second.t_s - first.t_s
    assert second.cpu_cores == pytest.approx(1.0 / dt, rel=1e-6)
    assert second.oom_delta == 2 and second.throttled_delta == 3
    assert (second.nr_periods, second.nr_throttled) == (1875, 215)  # v2: cpu.stat every read
    s.close()


def test_gone_and_unreadable_containers_do_not_stop_the_others(tmp_path: Path) -> None:
    s, dirs = _v2_sampler(tmp_path, "a", "b", "c")
    s.tick()
    shutil.rmtree(dirs["a"])
    s.cgroup("a").close()  # a regular file tree keeps open fds readable; cgroupfs gives ENODEV
    (dirs["b"] / "memory.current").write_text("garbage\n")
    res = s.tick()
    assert res.gone == ["a"]
    assert "b" in res.errors and "cannot parse" in res.errors["b"]
    assert [x.container_id for x in res.samples] == ["c"]
    s.untrack("a")
    assert s.ids() == ["b", "c"]
    s.close()


def test_real_v1_busy_process_rate(v1_cgroup, spawn) -> None:
    s = Sampler(lambda r: cgroups.CgroupV1(r.cgroup_path))
    s.track(ref(v1_cgroup.rel_path, version=1, path=v1_cgroup.rel_path))
    p = spawn(
        "import time\nprint('go', flush=True)\nt = time.monotonic()\n"
        "while time.monotonic() - t < 2: pass"
    )
    assert p.stdout.readline().strip() == "go"
    s.tick()

    asyncio.run(Ticker(0.1).run(lambda: None, n=4))
    (x,) = s.tick().samples
    assert 0.5 <= x.cpu_cores <= 1.2  # one busy thread, on a shared 2-core machine
    assert x.mem_bytes > 1 * MB
    s.close()


def test_real_v1_cgroup_removed_under_kept_fds(v1_cgroup) -> None:
    child = cgroups.create_v1(f"{v1_cgroup.rel_path}/gone")
    s = Sampler(lambda r: cgroups.CgroupV1(r.cgroup_path))
    s.track(ref("gone", version=1, path=child.rel_path))
    assert len(s.tick().samples) == 1  # fds now open
    cgroups.remove_v1(child.rel_path)
    assert s.tick().gone == ["gone"]
    s.close()


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_ticker_deadlines_do_not_drift_and_skip_when_late() -> None:
    c = FakeClock()
    t = Ticker(0.1, clock=c)
    assert t.next_deadline() == pytest.approx(0.1)
    c.t = 0.13  # work took 30 ms: the next deadline is still on the grid
    assert t.next_deadline() == pytest.approx(0.2)
    c.t = 0.75  # stalled for several periods: skip them, count them
    d = t.next_deadline()
    assert t.overruns >= 4 and d <= 0.75 + 1e-9 and round(d / 0.1, 6).is_integer()
    c.t = 0.76
    assert t.next_deadline() == pytest.approx(round(d + 0.1, 6))


def test_ticker_runs_on_its_deadlines_and_hands_errors_back() -> None:
    t, fired = Ticker(0.02), []
    asyncio.run(t.run(lambda: fired.append(time.monotonic()), n=10))
    assert len(fired) == 10 and t.k == 10 + t.overruns
    assert t.max_late_s < 0.1  # generous: a busy shared machine
    assert fired[0] >= t.start_s + 0.02 - 1e-3  # not before its deadline
    assert fired[-1] - t.start_s < 10 * 0.02 + 0.1  # on the grid, not 10 sleeps after the work

    def boom() -> None:
        if len(fired) == 12:
            raise RuntimeError("bad tick")
        fired.append(0.0)

    with pytest.raises(RuntimeError, match="bad tick"):
        asyncio.run(Ticker(0.01).run(boom))
    assert len(fired) == 12


def test_ticker_run_stops_when_cancelled() -> None:
    """The daemon's cleanup cancels the task awaiting run(): no callback fires after that."""
    fired: list[float] = []

    async def main() -> int:
        task = asyncio.create_task(Ticker(0.01).run(lambda: fired.append(1.0)))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n = len(fired)
        await asyncio.sleep(0.05)
        return n

    n = asyncio.run(main())
    assert n >= 3 and len(fired) == n


# ----------------------------------------------------------------- what is read on which tick
def test_idle_containers_are_read_on_their_slow_tick_only(tmp_path: Path) -> None:
    """v2 (no OOM eventfd): a hot container is read every tick, its OOM counter too; an idle one
    is read once in ``slow_every`` ticks, usage and OOM counter only (not its peak); a hot one's
    peak between its slow reads is the last one raised to the usage."""
    dirs = {n: v2_container(tmp_path, n) for n in ("hot", "idle")}  # slow ticks: hot's first
    s = Sampler(lambda r: cgroups.CgroupV2(r.cgroup_path), slow_every=5)
    for n, d in dirs.items():
        s.track(ref(n, version=2, path=str(d)))
    s.tick(hot={"hot"})  # first read of each: everything
    for d in dirs.values():
        events = (d / "memory.events").read_text()
        (d / "memory.events").write_text(events.replace("oom_kill 1", "oom_kill 2"))
        (d / "memory.current").write_text("200000000\n")  # above the peak last read (~122 MiB)
        (d / "memory.peak").write_text("250000000\n")
    seen: dict[str, list[int]] = {"idle": [], "hot": []}
    peaks, idle_peaks = [], []
    for _ in range(10):
        for x in s.tick(hot={"hot"}).samples:
            seen[x.container_id].append(x.oom_delta)
            (peaks if x.container_id == "hot" else idle_peaks).append(x.mem_peak_bytes)
    assert seen["hot"] == [1] + [0] * 9  # at once
    assert seen["idle"] == [1, 0]  # read twice in 10 ticks, the OOM counter each time
    assert idle_peaks == [200_000_000] * 2  # memory.peak (250 MB) not read while idle
    assert all(p >= 200_000_000 for p in peaks)  # never below the current usage
    assert peaks == [200_000_000] * 4 + [250_000_000] * 6  # the kernel's, from the slow tick on
    history = s.history("idle")
    assert len(history) == 3 and [m for _, _, m in history] == [84279296, 200_000_000, 200_000_000]
    assert math.isnan(history[0][1]) and history[1][0] < history[2][0]
    assert len(s.history("hot")) == 11 and len(s.history("hot", 4)) == 4
    s.close()


def test_a_new_container_is_read_at_once_and_the_history_ring_wraps(tmp_path: Path) -> None:
    s = Sampler(lambda r: cgroups.CgroupV2(r.cgroup_path), slow_every=50)
    for n in ("a", "b", "c"):  # slow ticks spread over the 50: a on the first, b the second
        s.track(ref(n, version=2, path=str(v2_container(tmp_path, n))))
    assert [x.container_id for x in s.tick(hot=()).samples] == ["a", "b", "c"]
    assert [x.container_id for x in s.tick(hot=()).samples] == ["b"]
    for _ in range(HISTORY + 5):
        s.tick(hot={"c"})
    h = s.history("c")
    assert len(h) == HISTORY and all(h[i][0] < h[i + 1][0] for i in range(HISTORY - 1))
    assert h[-1][0] == s.last("c").t_s
    s.close()


def test_live_none_reads_oom_every_tick(tmp_path: Path) -> None:
    s, dirs = _v2_sampler(tmp_path, "a", slow_every=100)
    s.tick()
    d = dirs["a"]
    events = (d / "memory.events").read_text()
    (d / "memory.events").write_text(events.replace("oom_kill 1", "oom_kill 4"))
    (x,) = s.tick().samples
    assert x.oom_delta == 3
    s.close()


def test_real_v1_oom_kill_is_seen_within_a_tick_through_the_eventfd(v1_cgroup, spawn) -> None:
    """No container is hot and the slow tick is far away: the kernel's OOM notification alone
    makes the sampler read the counter."""
    s = Sampler(lambda r: cgroups.CgroupV1(r.cgroup_path), slow_every=1000)
    cg = s.track(ref("c", version=1, path=v1_cgroup.rel_path))
    assert s._tracked["c"].efd is not None  # registered on this kernel
    p = spawn("import sys\nprint('go', flush=True)\nsys.stdin.readline()\nx = b'x' * (256 << 20)\n")
    assert p.stdout.readline().strip() == "go"
    s.tick(hot=())
    s.tick(hot=())  # the slow tick is now 999 ticks away
    cg.write_limits(cgroups.Limits(mem_limit_bytes=64 * MB), headroom_bytes=0)
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(timeout=10) == -9
    deltas = [x.oom_delta for _ in range(2) for x in s.tick(hot=()).samples]
    assert sum(deltas) >= 1 and deltas[0] >= 1
    assert s.oom_notifications >= 1
    s.untrack("c")
    assert not s._by_efd
    s.close()


def test_real_v1_a_held_task_makes_oom_fd_readable_and_tick_oom_reads_it_alone(
    v1_cgroup, spawn
) -> None:
    """Under the OOM hold the kernel's notification makes ``oom_fd`` readable; ``tick_oom``
    then reads that container alone, held (``mem_held``), without moving the tick count."""
    import select

    s = Sampler(lambda r: cgroups.CgroupV1(r.cgroup_path), slow_every=1000)
    cg = s.track(ref("c", version=1, path=v1_cgroup.rel_path))
    p = spawn("import sys\nprint('go', flush=True)\nsys.stdin.readline()\nx = b'x' * (256 << 20)\n")
    assert p.stdout.readline().strip() == "go"
    s.tick(hot=())
    s.tick(hot=())
    assert s.tick_oom().samples == []  # nothing signalled
    cg.write_limits(cgroups.Limits(mem_limit_bytes=64 * MB, mem_oom_hold=True), headroom_bytes=0)
    p.stdin.write("\n")
    p.stdin.flush()
    assert select.select([s.oom_fd()], [], [], 10)[0]  # readable: the kernel held the task
    ticks = s.ticks
    (x,) = s.tick_oom().samples
    assert x.container_id == "c" and x.mem_held and x.oom_delta == 0
    assert s.ticks == ticks and p.poll() is None
    assert not select.select([s.oom_fd()], [], [], 0)[0]  # drained
    cg.write_limits(cgroups.Limits(mem_limit_bytes=512 * MB), headroom_bytes=0)
    assert p.wait(timeout=10) == 0  # woken by the raise, not killed
    (y,) = s.tick(hot=()).samples  # the notification's second read, at the next tick
    assert not y.mem_held and y.oom_kills == 0
    s.close()


def _throttled_busy_ticks(v1_cgroup, spawn, watch: set[str]) -> tuple[Sampler, list]:
    """A busy loop at 0.1 core in 10 ms periods, sampled hot for 7 ticks of 50 ms."""
    s = Sampler(lambda r: cgroups.CgroupV1(r.cgroup_path), slow_every=3)
    cg = s.track(ref("c", version=1, path=v1_cgroup.rel_path))
    cg.write_limits(cgroups.Limits(cpu_quota_cores=0.1, cpu_period_us=10_000), headroom_bytes=0)
    spawn("while True: pass")

    out: list = []
    asyncio.run(Ticker(0.05).run(lambda: out.extend(s.tick(hot={"c"}, watch=watch).samples), n=7))
    return s, out


def test_real_v1_throttling_and_peak_follow_the_slow_ticks(v1_cgroup, spawn) -> None:
    s, xs = _throttled_busy_ticks(v1_cgroup, spawn, watch=set())
    # throttling moves only on the slow ticks (every 3rd), and then by the whole interval's count
    moved = [i for i, x in enumerate(xs) if x.throttled_delta > 0]
    assert moved and all(i % 3 == 0 for i in moved)
    assert all(x.mem_peak_bytes >= x.mem_bytes for x in xs)
    s.close()


def test_real_v1_watched_throttling_moves_every_tick(v1_cgroup, spawn) -> None:
    s, xs = _throttled_busy_ticks(v1_cgroup, spawn, watch={"c"})
    # watched: cpu.stat on every tick, ~5 periods of 10 ms per 50 ms tick, all throttled
    periods = [b.nr_periods - a.nr_periods for a, b in zip(xs, xs[1:], strict=False)]
    assert all(p > 0 for p in periods), periods
    assert sum(x.throttled_delta > 0 for x in xs[1:]) >= 5
    s.close()
