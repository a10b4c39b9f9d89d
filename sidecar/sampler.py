"""Per-tick usage snapshots of every managed container, and the drift-free monotonic ticker.

The sampler owns one ``sidecar.cgroups.Cgroup`` per container (kept fds, re-read with pread) and
turns cumulative counters into per-window figures: CPU rate in cores over the last window,
throttling and OOM-kill deltas. A container whose cgroup vanished is reported in ``gone``; an
unreadable file is an ``errors`` entry for that container only (the others are still sampled).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar import cgroups
from sidecar.runtimes.base import ContainerRef


@dataclass(frozen=True, slots=True)
class Sample:
    """One container over one window (the first sample of a container has NaN rates)."""

    container_id: str
    t_s: float
    cpu_cores: float
    """Mean CPU use over the window, cores (NaN on the first sample)."""
    window_s: float
    """Length of the window ending at t_s (NaN on the first sample)."""
    mem_bytes: int
    mem_peak_bytes: int
    """Kernel peak since the last reset (-1 if unknown)."""
    oom_kills: int
    oom_delta: int
    throttled_delta: int
    mem_pressure: float | None


@dataclass
class _Tracked:
    ref: ContainerRef
    cg: cgroups.Cgroup
    last: cgroups.Usage | None = None


@dataclass
class TickResult:
    samples: list[Sample] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


class Sampler:
    def __init__(self, open_cgroup: Callable[[ContainerRef], cgroups.Cgroup]) -> None:
        self._open = open_cgroup
        self._tracked: dict[str, _Tracked] = {}
        self.ticks = 0
        self.last_tick_s = math.nan

    def track(self, ref: ContainerRef) -> cgroups.Cgroup:
        t = self._tracked.get(ref.id)
        if t is not None and t.ref.cgroup_path == ref.cgroup_path:
            t.ref = ref
            return t.cg
        if t is not None:
            t.cg.close()
        cg = self._open(ref)
        self._tracked[ref.id] = _Tracked(ref, cg)
        return cg

    def untrack(self, container_id: str) -> None:
        t = self._tracked.pop(container_id, None)
        if t is not None:
            t.cg.close()

    def cgroup(self, container_id: str) -> cgroups.Cgroup | None:
        t = self._tracked.get(container_id)
        return t.cg if t else None

    def ids(self) -> list[str]:
        return list(self._tracked)

    def last(self, container_id: str) -> cgroups.Usage | None:
        t = self._tracked.get(container_id)
        return t.last if t else None

    def sample_one(self, container_id: str) -> Sample:
        """Read one container now (raises CgroupError)."""
        t = self._tracked[container_id]
        u = t.cg.read_usage()
        prev = t.last
        t.last = u
        if prev is None:
            return Sample(
                container_id,
                u.t_s,
                math.nan,
                math.nan,
                u.mem_bytes,
                u.mem_peak_bytes,
                u.oom_kills,
                0,
                0,
                u.mem_pressure_some_avg10,
            )
        dt = u.t_s - prev.t_s
        rate = (u.cpu_usage_s - prev.cpu_usage_s) / dt if dt > 0 else math.nan
        return Sample(
            container_id,
            u.t_s,
            max(0.0, rate),
            dt,
            u.mem_bytes,
            u.mem_peak_bytes,
            u.oom_kills,
            max(0, u.oom_kills - prev.oom_kills),
            max(0, u.nr_throttled - prev.nr_throttled),
            u.mem_pressure_some_avg10,
        )

    def tick(self) -> TickResult:
        out = TickResult()
        for cid in list(self._tracked):
            try:
                out.samples.append(self.sample_one(cid))
            except cgroups.CgroupGone:
                out.gone.append(cid)
            except cgroups.CgroupError as exc:
                out.errors[cid] = str(exc)
        self.ticks += 1
        self.last_tick_s = time.monotonic()
        return out

    def close(self) -> None:
        for t in self._tracked.values():
            t.cg.close()
        self._tracked.clear()


class Ticker:
    """Deadlines at start + k * period on time.monotonic(); a late tick skips missed deadlines.

    ``await ticker.wait()`` sleeps until the next deadline (never sleep(period) after the work,
    which drifts). ``overruns`` counts deadlines skipped because a tick ran over.
    """

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self.clock = clock
        self.start_s = clock()
        self.k = 0
        self.overruns = 0
        self.max_late_s = 0.0

    def next_deadline(self) -> float:
        self.k += 1
        deadline = self.start_s + self.k * self.period_s
        now = self.clock()
        if now > deadline + self.period_s:  # more than a whole period late: skip, count
            missed = int((now - deadline) // self.period_s)
            self.overruns += missed
            self.k += missed
            deadline = self.start_s + self.k * self.period_s
        return deadline

    async def wait(self) -> float:
        deadline = self.next_deadline()
        delay = deadline - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        late = self.clock() - deadline
        self.max_late_s = max(self.max_late_s, late)
        return late
