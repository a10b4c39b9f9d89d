"""Per-tick usage snapshots of every managed container, and the drift-free monotonic ticker.

The sampler owns one ``sidecar.cgroups.Cgroup`` per container (kept fds, re-read with pread) and
turns cumulative counters into per-window figures: CPU rate in cores over the last window,
throttling and OOM-kill deltas. A container whose cgroup vanished is reported in ``gone``; an
unreadable file is an ``errors`` entry for that container only (the others are still sampled).

Cost (budget: 1% of a core for 100 containers at 10 Hz, i.e. 10 us per container per tick, where
one pread of a cgroup file costs 1-3 us). A tick reads only the containers due, and looks at no
other: the *hot* ones (``tick(hot=...)``, chosen by the node: running an invocation, holding a
decision's limits, or with inferred boundaries) have CPU and memory usage read every tick; every
container has a *slow tick*, one in ``slow_every``, spread over the ticks (each container is in
one of ``slow_every`` phase buckets). On its slow tick a hot container is read in full; an idle one
(at its user's size) has its CPU and memory usage read, about once a second at the defaults, and
nothing else: its peak, throttling and PSI mean nothing until its next invocation, whose start
reads it in full. A container with no sample yet is read on the next tick. The OOM counter: on v1
the kernel signals an eventfd on every OOM in the cgroup (``Cgroup.oom_eventfd``), one
``epoll_wait`` per tick covers every container, and a signalled container is read, OOM counter
included, on that tick and the next, hot or not (the daemon also watches the epoll in its
event loop and reads a signalled container at once, between ticks: ``tick_oom``, so a task held
at its limit waits for no tick); without an eventfd (v2) the counter is read whenever the
container is. The memory peak, PSI and v1 throttling counters are read on a hot
container's slow ticks (in between the peak is the last one read, raised to the current usage),
except that the throttling counters of the *watched* containers (``tick(watch=...)``: those
holding a harvested CPU quota, for the throttle give-back) are read every tick: one more pread of
``cpu.stat`` on v1, none on v2 (usage is in the same file). An invocation's start and end read the
container in full at once (the node, through ``cgroup``), without moving its window; so idle
sampling cannot delay a give-back (the container is hot from its start) or an OOM (the eventfd,
or on v2 a read every tick while hot).

Each container keeps its last ``HISTORY`` samples (time, CPU cores, memory bytes) in a fixed ring
of doubles for the debug page's timeline: 7 KB per container, no allocation per sample.
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import time
from array import array
from collections.abc import Callable, Collection, Container
from dataclasses import dataclass, field
from typing import NamedTuple

from sidecar import cgroups
from sidecar.runtimes.base import ContainerRef

HISTORY = 300
"""Samples kept per container: 30 s of a hot container at 10 Hz, 5 min of an idle one."""


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
    nr_periods: int = 0
    """CFS periods with a quota (cumulative; current on a slow tick and for watched containers)."""
    nr_throttled: int = 0
    """Of those, the throttled ones (cumulative, as fresh as nr_periods)."""
    mem_held: bool = False
    """v1: a task waits at the harvested hard limit (``Limits.mem_oom_hold``) as last read."""


@dataclass(slots=True)
class _Tracked:
    ref: ContainerRef
    cg: cgroups.Cgroup
    last: cgroups.Usage | None = None
    phase: int = 0  # its slow tick: ticks with ``ticks % slow_every == phase``
    efd: int | None = None  # OOM eventfd registered with the sampler's epoll
    oom_due: int = 0  # ticks left on which the OOM counter is read (after a notification)
    history: array = field(default_factory=lambda: array("d", bytes(24 * HISTORY)))
    """(t_s, cpu_cores, mem_bytes) triples, a ring; ``at`` is the next slot's first index."""
    at: int = 0
    recorded: int = 0


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
        self._phases: list[dict[str, _Tracked]] = [{} for _ in range(self.slow_every)]
        self._due: dict[str, _Tracked] = {}  # read next tick: never read yet, or OOM-notified
        self._epoll: select.epoll | None = select.epoll()  # the OOM eventfds (oom_fd)
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
        phase = min(range(self.slow_every), key=lambda k: len(self._phases[k]))
        t = self._tracked[ref.id] = _Tracked(ref, cg, phase=phase)
        self._phases[phase][ref.id] = t
        self._due[ref.id] = t
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

    def set_slow_every(self, slow_every: int) -> None:
        """Give every container one of ``slow_every`` slow-tick phases from now on (a config
        reload), spread as evenly as ``track`` spreads them."""
        self.slow_every = max(1, slow_every)
        self._phases = [{} for _ in range(self.slow_every)]
        for k, (cid, t) in enumerate(self._tracked.items()):
            t.phase = k % self.slow_every
            self._phases[t.phase][cid] = t

    def _close(self, t: _Tracked) -> None:
        self._phases[t.phase].pop(t.ref.id, None)
        self._due.pop(t.ref.id, None)
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

    def history(self, container_id: str, limit: int = HISTORY) -> list[tuple[float, float, int]]:
        """The container's last ``limit`` samples as (t_s, cpu_cores, mem_bytes), oldest first
        (cpu_cores NaN: the first sample, no window yet)."""
        t = self._tracked.get(container_id)
        if t is None:
            return []
        h, n = t.history, min(t.recorded, HISTORY, limit)
        start = (t.at - 3 * n) % (3 * HISTORY)
        out = []
        for k in range(n):
            i = (start + 3 * k) % (3 * HISTORY)
            out.append((h[i], h[i + 1], int(h[i + 2])))
        return out

    def oom_fd(self) -> int:
        """A descriptor that turns readable when the kernel signals an OOM in a tracked container
        (the epoll of the OOM eventfds), for an event loop to call ``tick_oom`` at once."""
        if self._epoll is None:  # closed: a new one
            self._epoll = select.epoll()
        return self._epoll.fileno()

    def tick_oom(self) -> TickResult:
        """Between ticks: read only the containers whose OOM eventfd the kernel signalled (a task
        waiting at a held limit is given its memory back now, not at the next tick). The tick
        count and the slow-tick phases do not move."""
        return self.tick(hot=(), only_notified=True)

    def tick(
        self,
        hot: Collection[str] | None = None,
        watch: Container[str] = (),
        only_notified: bool = False,
    ) -> TickResult:
        """Sample the containers due this tick (see the module docstring); ``hot``: the
        containers read every tick (None = all); ``watch``: those of them whose throttling
        counters are read every tick too; ``only_notified``: ``tick_oom``."""
        out = TickResult()
        if self._by_efd:
            self._notified()
        phase = self.ticks % self.slow_every
        if only_notified:
            due: dict[str, _Tracked] = {c: t for c, t in self._due.items() if t.oom_due}
        elif hot is None:
            due = self._tracked
        else:
            due = {**self._phases[phase], **self._due}
            tracked = self._tracked
            for cid in hot:
                if (t := tracked.get(cid)) is not None:
                    due[cid] = t
        self._due = {c: t for c, t in self._due.items() if c not in due} if only_notified else {}
        append, nan = out.samples.append, math.nan
        for cid, t in due.items():
            busy = hot is None or cid in hot
            if t.oom_due:
                t.oom_due -= 1
                oom = True
                if t.oom_due:
                    self._due[cid] = t
            else:
                oom = t.efd is None
            try:
                u = t.cg.read_usage(oom, busy and t.phase == phase, cid in watch)
                prev, t.last = t.last, u
                if prev is None:  # the first sample: no window yet (this loop is the hot path)
                    rate = dt = nan
                    d_oom = d_thr = 0
                else:
                    dt = u[0] - prev[0]
                    rate = (u[1] - prev[1]) / dt if dt > 0 else nan
                    rate = rate if rate > 0.0 else 0.0  # as max(0.0, rate): NaN (dt <= 0) -> 0.0
                    d_oom, d_thr = u[6] - prev[6], u[2] - prev[2]
                h, i = t.history, t.at  # the history ring
                h[i], h[i + 1], h[i + 2] = u[0], rate, u[4]
                t.at = i + 3 if i + 3 < 3 * HISTORY else 0
                t.recorded += 1
                append(
                    Sample(
                        cid,
                        u[0],
                        rate,
                        dt,
                        u[4],
                        u[5],
                        u[6],
                        d_oom if d_oom > 0 else 0,
                        d_thr if d_thr > 0 else 0,
                        u[7],
                        u[8],
                        u[2],
                        u[9],
                    )  # fmt: skip
                )
            except cgroups.CgroupGone:
                out.gone.append(cid)
            except cgroups.CgroupError as exc:
                out.errors[cid] = str(exc)
                if t.last is None:
                    self._due[cid] = t  # never read: try again next tick
        if not only_notified:
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
                self._due[t.ref.id] = t
                self.oom_notifications += 1

    def close(self) -> None:
        for t in self._tracked.values():
            self._close(t)
        self._tracked.clear()
        self._phases = [{} for _ in range(self.slow_every)]
        self._due = {}
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None


class Ticker:
    """Deadlines at start + k * period on time.monotonic(); a late tick skips missed deadlines.

    ``await ticker.run(fn)`` calls ``fn`` at every deadline (never sleep(period) after the work,
    which drifts). ``overruns`` counts deadlines skipped because a tick ran over.
    """

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self.clock = clock
        self.start_s = clock()
        self.k = 0
        self.overruns = 0
        self.max_late_s = 0.0
        self._reschedule: Callable[[], None] | None = None
        """While ``run`` runs: replaces the timer of the next deadline (``set_period``)."""

    def set_period(self, period_s: float) -> None:
        """Tick every ``period_s`` from now on (a config reload): the next tick comes one new
        period from now, not at the deadline the old period scheduled."""
        self.period_s, self.start_s, self.k = period_s, self.clock(), 0
        if self._reschedule is not None:
            self._reschedule()

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

    async def run(self, fn: Callable[[], object], n: int | None = None) -> None:
        """Call ``fn()`` at each deadline, ``n`` times (None: until cancelled); an exception
        from ``fn`` ends the run with it.

        ``fn`` is a callback of the event loop's own timer, not the step of a task awaiting
        ``asyncio.sleep``: waking a sleeping task takes a second loop iteration (the timer
        completes a future, the future schedules the task), which at 10 Hz costs about 0.08%
        of a core more (docs/sidecar.md, "Sampling cost")."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        handle: asyncio.TimerHandle | None = None
        count = 0

        def schedule() -> None:
            nonlocal handle
            if handle is not None:
                handle.cancel()  # a no-op once it fired
            deadline = self.next_deadline()
            handle = loop.call_at(loop.time() + deadline - self.clock(), fire, deadline)

        def fire(deadline: float) -> None:
            nonlocal count
            self.max_late_s = max(self.max_late_s, self.clock() - deadline)
            try:
                fn()
            except Exception as exc:  # handed to the awaiting caller
                done.set_exception(exc)
                return
            count += 1
            if n is not None and count >= n:
                done.set_result(None)
            else:
                schedule()

        schedule()
        self._reschedule = schedule
        try:
            await done
        finally:
            self._reschedule = None
            if handle is not None:
                handle.cancel()
