"""Per-tick usage snapshots of every managed container, and the drift-free monotonic ticker.

The sampler owns one ``sidecar.cgroups.Cgroup`` per container (kept fds, re-read with pread) and
turns cumulative counters into per-window figures: CPU rate in cores over the last window,
throttling and OOM-kill deltas. A container whose cgroup vanished is reported in ``gone``; an
unreadable file is an ``errors`` entry for that container only (the others are still sampled).

Cost (budget: 1% of a core for 100 containers at 10 Hz, i.e. 10 us per container per tick, where
one pread of a cgroup file costs 1-3 us): CPU and memory usage are read every tick; the slowly-
changing files less often. The OOM counter: on v1 the kernel signals an eventfd on every OOM in the
cgroup (``Cgroup.oom_eventfd``), one ``epoll_wait`` per tick covers every container, and a
signalled container's counter is read on that tick and the next; without an eventfd (v2) it is
read every tick for the containers running an invocation (``tick(live=...)``; all when ``live`` is
None). Every container's OOM counter, memory peak, PSI and v1 throttling counters are also read
every ``slow_every`` ticks (in between the peak is the last one read, raised to the current usage;
an invocation's start and end read everything afresh). Slow reads are spread over the ticks.
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import NamedTuple

from sidecar import cgroups
from sidecar.runtimes.base import ContainerRef


class Sample(NamedTuple):
    """One container over one window (the first sample of a container has NaN rates).

    Immutable (a NamedTuple: one per container per tick, cheaper to build than a dataclass)."""

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


@dataclass(slots=True)
class _Tracked:
    ref: ContainerRef
    cg: cgroups.Cgroup
    last: cgroups.Usage | None = None
    slow_in: int = 0  # ticks until the next read of the slowly-changing files
    efd: int | None = None  # OOM eventfd registered with the sampler's epoll
    oom_due: int = 0  # ticks left on which the OOM counter is read (after a notification)


@dataclass
class TickResult:
    samples: list[Sample] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


class Sampler:
    def __init__(
        self, open_cgroup: Callable[[ContainerRef], cgroups.Cgroup], slow_every: int = 10
    ) -> None:
        self._open = open_cgroup
        self.slow_every = max(1, slow_every)
        self._tracked: dict[str, _Tracked] = {}
        self._epoll: select.epoll | None = None
        self._by_efd: dict[int, _Tracked] = {}
        self.oom_notifications = 0
        self.ticks = 0
        self.last_tick_s = math.nan

    def track(self, ref: ContainerRef) -> cgroups.Cgroup:
        t = self._tracked.get(ref.id)
        if t is not None and t.ref.cgroup_path == ref.cgroup_path:
            t.ref = ref
            return t.cg
        if t is not None:
            self._close(t)
        cg = self._open(ref)
        t = self._tracked[ref.id] = _Tracked(ref, cg, slow_in=len(self._tracked) % self.slow_every)
        watch = getattr(cg, "oom_eventfd", None)
        if watch is not None and (efd := watch()) is not None:
            try:
                if self._epoll is None:
                    self._epoll = select.epoll()
                self._epoll.register(efd, select.EPOLLIN)
                t.efd = efd
                self._by_efd[efd] = t
            except OSError:
                pass  # read the counter every tick instead
        return cg

    def _close(self, t: _Tracked) -> None:
        if t.efd is not None:
            self._by_efd.pop(t.efd, None)
            if self._epoll is not None:
                try:
                    self._epoll.unregister(t.efd)
                except OSError:
                    pass
            t.efd = None
        t.cg.close()

    def untrack(self, container_id: str) -> None:
        t = self._tracked.pop(container_id, None)
        if t is not None:
            self._close(t)

    def cgroup(self, container_id: str) -> cgroups.Cgroup | None:
        t = self._tracked.get(container_id)
        return t.cg if t else None

    def ids(self) -> list[str]:
        return list(self._tracked)

    def last(self, container_id: str) -> cgroups.Usage | None:
        t = self._tracked.get(container_id)
        return t.last if t else None

    def sample_one(self, container_id: str, oom: bool = True, slow: bool = True) -> Sample:
        """Read one container now (raises CgroupError); see ``Cgroup.read_usage`` for the flags."""
        t = self._tracked[container_id]
        return self._sample(t, t.cg.read_usage(oom, slow))

    @staticmethod
    def _sample(t: _Tracked, u: cgroups.Usage) -> Sample:
        container_id = t.ref.id
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
        oom_delta = u.oom_kills - prev.oom_kills
        throttled_delta = u.nr_throttled - prev.nr_throttled
        return Sample(
            container_id,
            u.t_s,
            rate if rate > 0.0 else 0.0,  # as max(0.0, rate): NaN (dt <= 0) -> 0.0
            dt,
            u.mem_bytes,
            u.mem_peak_bytes,
            u.oom_kills,
            oom_delta if oom_delta > 0 else 0,
            throttled_delta if throttled_delta > 0 else 0,
            u.mem_pressure_some_avg10,
        )

    def tick(self, live: Container[str] | None = None) -> TickResult:
        """Sample every container; ``live``: the containers running an invocation (None = all)."""
        out = TickResult()
        if self._by_efd:
            self._notified()
        every, append, nan = self.slow_every, out.samples.append, math.nan
        for cid, t in list(self._tracked.items()):
            slow = t.slow_in <= 0
            t.slow_in = every - 1 if slow else t.slow_in - 1
            if t.oom_due:
                t.oom_due -= 1
                oom = True
            else:
                oom = slow or (t.efd is None and (live is None or cid in live))
            try:
                u = t.cg.read_usage(oom, slow)
                prev, t.last = t.last, u
                if prev is None:  # as _sample, inlined: this loop runs 1000 times a second
                    append(Sample(cid, u[0], nan, nan, u[4], u[5], u[6], 0, 0, u[7]))
                    continue
                dt = u[0] - prev[0]
                rate = (u[1] - prev[1]) / dt if dt > 0 else nan
                d_oom, d_thr = u[6] - prev[6], u[2] - prev[2]
                append(
                    Sample(
                        cid,
                        u[0],
                        rate if rate > 0.0 else 0.0,
                        dt,
                        u[4],
                        u[5],
                        u[6],
                        d_oom if d_oom > 0 else 0,
                        d_thr if d_thr > 0 else 0,
                        u[7],
                    )  # fmt: skip
                )
            except cgroups.CgroupGone:
                out.gone.append(cid)
            except cgroups.CgroupError as exc:
                out.errors[cid] = str(exc)
        self.ticks += 1
        self.last_tick_s = time.monotonic()
        return out

    def _notified(self) -> None:
        """Drain the OOM eventfds the kernel signalled; read those counters this tick and next
        (the notification comes just before the kill is counted)."""
        assert self._epoll is not None
        for fd, _ in self._epoll.poll(0):
            t = self._by_efd.get(fd)
            try:
                os.read(fd, 8)
            except OSError:
                pass
            if t is not None:
                t.oom_due = 2
                self.oom_notifications += 1

    def close(self) -> None:
        for t in self._tracked.values():
            self._close(t)
        self._tracked.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None


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
