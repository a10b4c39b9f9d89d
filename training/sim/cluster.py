"""The event-driven cluster: placement, warm containers, admission queueing, contention, OOM.

One decision per invocation, at arrival. The loop is plain Python over a heap of completion
events merged with the (pre-sorted) arrival stream; every per-invocation random draw was made
up front by the workload, so a run is a pure function of (workload, cluster, manager) and the
counterfactual "same invocation at the user's size" shares its noise draw.

Duration model for invocation i of function f given c cores and m MB (d = the trace's duration
at the user's size in isolation, n = noise, p = parallelism, phi = CPU-bound share):

    t(c, m) = [d * n * (1 - phi) + kappa(c) * S(W, c)] * M(m) / M(mu)

S is the CPU part under a CFS quota of c cores per period T (``cfs_cpu_time``): the quota is a
budget per period, not a rate cap, so the invocation runs at r = min(p, server cores) until it has
spent c * T core-seconds in the period, then waits for the next one. Its CPU work W (core-seconds)
is the inverse of S at the user's size u, so that S(W, u) = d * n * phi: the trace's duration is
kept (up to the staircase's gaps: ``cfs_work``). A burst that fits one period's quota is not slowed
at all; longer ones follow a staircase in ceil(W / (c T)) periods that tends to the linear d * n *
phi * min(u, p) / min(c, p) when W >> c T (times the multi-threaded throttling penalty when p > 1).
kappa(c) = max(1, load / cores) is CPU contention on the server from everything running there, this
invocation's own use included (phi times the mean rate W / S of its CPU part: a burst runs above
its quota). M is the memory-pressure factor (1 + beta when memory is tight, 1 with 25% room above
the working set; beta is 0 by default: measured runs are not slowed above their peak). The working
set includes the warm worker's idle memory. Below it the invocation is OOM-killed part-way and
retried at the user's size (counted as a failure). Queued invocations do not progress; memory is
reserved at admission, CPU may be over-committed up to ``cpu_overcommit`` and then shows up as
contention. The constants are measured on real functions: docs/duration-model.md.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from sidecar.core.decision import Decider
from sidecar.core.features import NodeState
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.reward import RewardConfig, invocation_reward
from sidecar.core.safeguard import Guard, SafeguardConfig, SafeguardState
from sidecar.core.stats import FunctionStats
from training.sim.workload import Workload

MEM_ROOM = 0.25
"""Memory above the working set (as a share of it) beyond which pressure no longer slows a run."""
OOM_AT = 0.5
"""An OOM-killed run dies this far into its execution (memory grows as it runs)."""


@dataclass(frozen=True)
class ClusterConfig:
    servers: int = 20
    cores: float = 8.0
    mem_mb: float = 2048.0
    cpu_overcommit: float = 2.0
    """Admission allows allocated CPU up to this multiple of the cores (CPU is shares, not
    slots)."""
    keep_alive_s: float = 600.0
    queue_scan: int = 16
    """How many queued invocations to try when resources free up (limits head-of-line blocking)."""
    cfs_period_s: float = 0.1
    """CFS period of the CPU quota (cgroup ``cpu.cfs_period_us``): an invocation's quota of c cores
    is a budget of c * period core-seconds per period. 100 ms is the kernel's default, the period
    the sidecar actuates with and the one of the measured curves (docs/duration-model.md: matmul
    48 / 118 / 397 ms at 1 / 0.5 / 0.25 core, a staircase in periods)."""
    throttle_penalty_multithread: float = 1.15
    """Wall time of a throttled period for multi-threaded code (p > 1), in periods: threads
    stalled together lose extra time. Measured at a 100 ms period from 2-thread zlib and BLAS
    (zlibmt 496 ms at 0.25 core vs ~430 ms by the plain staircase; docs/duration-model.md); it
    grows at shorter periods (/work/shared/reference/platform.md)."""


@dataclass(slots=True)
class Request:
    """One invocation waiting for its allocation."""

    inv: int
    fn: int
    user: Alloc
    now_s: float
    guard: Guard
    stats: FunctionStats
    guard_state: SafeguardState


_FIELDS = (
    "cpu",
    "mem",
    "exec_s",
    "baseline_s",
    "queue_s",
    "cold_s",
    "failed",
    "cpu_peak",
    "mem_peak",
    "reward",
    "done",
)


class Log:
    """Per-invocation outcomes while the run goes on: plain lists, written on the hot path.

    Managers read single entries from here (``sim.log.exec_s[inv]``); whole-run analysis uses
    the numpy snapshot ``sim.results``. NaN / 0 until an invocation has started or finished.
    """

    __slots__ = ("fn", *_FIELDS)

    def __init__(self, wl: Workload) -> None:
        n = wl.n_invocations
        nan = float("nan")
        self.fn: list[int] = wl.fn.tolist()
        self.cpu = [0] * n
        self.mem = [0] * n
        for name in ("exec_s", "baseline_s", "queue_s", "cold_s", "cpu_peak", "mem_peak", "reward"):
            setattr(self, name, [nan] * n)
        self.failed = [False] * n
        self.done = [False] * n


@dataclass(frozen=True)
class Results:
    """A numpy snapshot of a run's log (cpu/mem in grid units, times in s, peaks in cores/MB)."""

    fn: np.ndarray
    cpu: np.ndarray
    mem: np.ndarray
    exec_s: np.ndarray
    baseline_s: np.ndarray
    queue_s: np.ndarray
    cold_s: np.ndarray
    failed: np.ndarray
    cpu_peak: np.ndarray
    mem_peak: np.ndarray
    reward: np.ndarray
    done: np.ndarray = field(repr=False)

    @classmethod
    def of(cls, log: Log) -> Results:
        return cls(fn=np.asarray(log.fn), **{k: np.asarray(getattr(log, k)) for k in _FIELDS})


def cfs_cpu_time(work: float, cores: float, rate: float, period: float, penalty: float) -> float:
    """Wall time (s, in isolation) of ``work`` core-seconds of CPU under a CFS quota of ``cores``
    per ``period``, running at ``rate`` cores while the period's quota lasts.

    The hot path's CPU term, so plain floats. When ``rate <= cores`` the quota never binds. Else
    every period but the last is throttled and costs ``period * penalty``; the last runs what is
    left, (0, cores * period] core-seconds, at ``rate``. A burst that fits one period's quota is
    not slowed; a long run tends to ``penalty * work / cores``, the linear model.
    """
    if rate <= cores:
        return work / rate
    budget = cores * period
    k = math.ceil(work / budget) - 1
    if k <= 0:
        return work / rate
    return k * period * penalty + (work - k * budget) / rate


def cfs_work(
    cpu_s: np.ndarray, cores: np.ndarray, rate: np.ndarray, period: float, penalty: np.ndarray
) -> np.ndarray:
    """The CPU work (core-seconds) ``cfs_cpu_time`` runs in ``cpu_s`` at ``cores``: its inverse.

    Used once per workload to turn the trace's duration at the user's size into the work W that
    every other size then runs. A staircase cannot take every time: a time in the gap between a
    period's last burst and the next period maps to the nearer reachable step (the work just at,
    or just over, a whole number of periods' quota).
    """
    budget = cores * period
    step = period * penalty
    k = np.floor(cpu_s / step)
    last = (cpu_s - k * step) * rate  # work done in the last, partial period
    # Gap: cpu_s lies in (k * step + budget / rate, (k + 1) * step); 1e-9 keeps ceil() on the
    # intended side of the whole number of periods.
    nearer_low = cpu_s - (k * step + budget / rate) < (k + 1) * step - cpu_s
    gap = (k + 1) * budget * np.where(nearer_low, 1.0 - 1e-9, 1.0 + 1e-9)
    throttled = np.where(last <= budget, k * budget + last, gap)
    return np.where(rate <= cores, cpu_s * rate, throttled)


def _tightness(mem_mb: float, ws: float) -> float:
    """0 with MEM_ROOM or more above the working set, rising linearly to 1 at the working set."""
    t = 1.0 - (mem_mb - ws) / (MEM_ROOM * ws)
    return 0.0 if t < 0.0 else (1.0 if t > 1.0 else t)


class _Server:
    __slots__ = ("free_mem", "cpu_alloc", "load")

    def __init__(self, mem_mb: float) -> None:
        self.free_mem = mem_mb
        self.cpu_alloc = 0.0
        self.load = 0.0  # average cores in use by running invocations


class ClusterSim:
    """Replays a workload; ``next_request()`` / ``apply()`` is the decision interface."""

    def __init__(
        self,
        workload: Workload,
        cluster: ClusterConfig,
        grid: ResourceGrid,
        safeguard: SafeguardConfig = SafeguardConfig(),
        reward: RewardConfig = RewardConfig(),
    ) -> None:
        self.wl = workload
        self.cluster = cluster
        self.grid = grid
        self.decider = Decider(grid, safeguard)
        """The decision path the host runs: the guard for every request, the rest for the
        managers and the env that score candidates."""
        self.reward_cfg = reward
        if cluster.mem_mb < grid.max_mb or cluster.cores * cluster.cpu_overcommit < grid.max_cores:
            raise ValueError("a server must be able to hold the grid's largest allocation")
        # Plain lists: scalar indexing of Python lists is several times faster than numpy's.
        self._arr = workload.arrival_s.tolist()
        self._fn = workload.fn.tolist()
        self._dur = (workload.duration_s * workload.noise).tolist()
        self._ws = workload.working_set_mb.tolist()
        self._cold = workload.cold_start_s.tolist()
        self._par = workload.parallelism.tolist()
        self._phi = workload.cpu_frac.tolist()
        self._beta = workload.mem_pressure.tolist()
        self._ucpu = workload.user_cpu.tolist()
        self._umem = workload.user_mem.tolist()
        # CFS: per function the burst rate (its threads, at most a server's cores) and the cost of
        # a throttled period; per invocation its CPU work, its CPU time at the user's size and
        # the cores it uses on average meanwhile (its share of the server's load).
        period = cluster.cfs_period_s
        rate = np.minimum(workload.parallelism, cluster.cores)
        pen = np.where(workload.parallelism > 1.0, cluster.throttle_penalty_multithread, 1.0)
        user_cores = workload.user_cpu * grid.cpu_unit_cores
        fn = workload.fn
        cpu_at_user = workload.duration_s * workload.noise * workload.cpu_frac[fn]
        work = cfs_work(cpu_at_user, user_cores[fn], rate[fn], period, pen[fn])
        self._period = period
        self._rate = rate.tolist()
        self._pen = pen.tolist()
        self._work = work.tolist()
        ucores = user_cores.tolist()
        self._cpu_user = [
            cfs_cpu_time(w, ucores[f], self._rate[f], period, self._pen[f])
            for w, f in zip(self._work, self._fn)
        ]
        self._use_user = [w / t if t > 0.0 else 0.0 for w, t in zip(self._work, self._cpu_user)]
        # Hot-path constants: unit sizes, the users' sizes in cores / MB, the admission cap.
        self._cu = grid.cpu_unit_cores
        self._mu = grid.mem_unit_mb
        self._ucores = (workload.user_cpu * grid.cpu_unit_cores).tolist()
        self._umb = (workload.user_mem * grid.mem_unit_mb).tolist()
        self._cap_cpu = cluster.cores * cluster.cpu_overcommit
        self._user = [Alloc(c, m) for c, m in zip(self._ucpu, self._umem)]
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        c = self.cluster
        self.now = 0.0
        self.servers = [_Server(c.mem_mb) for _ in range(c.servers)]
        self.total_cores = c.cores * c.servers
        self.total_mem = c.mem_mb * c.servers
        self.used_mem = 0.0
        self.used_load = 0.0
        self.stats = [FunctionStats() for _ in range(self.wl.n_functions)]
        self.guards = [SafeguardState() for _ in range(self.wl.n_functions)]
        self.log = Log(self.wl)
        # fn -> {server: idle-since times of its warm containers there, oldest first}
        self._warm: list[dict[int, list[float]]] = [{} for _ in range(self.wl.n_functions)]
        self.cold_starts = 0
        self._next_arrival = 0
        self._events: list[tuple[float, int]] = []  # (finish time, invocation)
        self._queue: deque[int] = deque()
        self._queued_at: dict[int, float] = {}
        self._running: dict[
            int, tuple[int, float, float, float]
        ] = {}  # inv -> server, mem, cpu, load
        self._guard_of: dict[int, Guard] = {}
        self._request: Request | None = None
        self.finished: list[int] = []
        """Invocations finished since the caller last cleared this list (managers observe them)."""
        self.rewarded: list[int] = []
        """Invocations whose outcome (and so reward) became known since the caller last cleared
        this list. The simulator knows an invocation's execution time when it starts, so its
        reward is available then, not minutes later at its end: a learner credits it to the
        decision at once instead of losing it past the end of a rollout."""

    @property
    def results(self) -> Results:
        """The run so far as numpy arrays (a snapshot: build it once, after the run)."""
        return Results.of(self.log)

    def node_state(self) -> NodeState:
        return NodeState(
            total_cores=self.total_cores,
            total_mem_mb=self.total_mem,
            free_cores=self.total_cores - self.used_load,
            free_mem_mb=self.total_mem - self.used_mem,
            pending=len(self._queue),
        )

    def user_alloc(self, fn: int) -> Alloc:
        return self._user[fn]

    def oracle_alloc(self, inv: int) -> Alloc:
        """The smallest allocation that runs this invocation as fast as it can run (true demand).

        CPU: the fewest units whose CFS time equals that at its parallelism, so a burst that fits
        one period's quota at fewer cores gets fewer (same time, same load, less allocated).
        """
        fn = self._fn[inv]
        g = self.grid
        full = min(g.cpu_units, max(1, g.cpu_units_ceil(self._par[fn])))
        work, rate, pen = self._work[inv], self._rate[fn], self._pen[fn]
        fastest = cfs_cpu_time(work, full * self._cu, rate, self._period, pen)
        cpu = next(
            c
            for c in range(1, full + 1)
            if cfs_cpu_time(work, c * self._cu, rate, self._period, pen) <= fastest * (1 + 1e-9)
        )
        room = MEM_ROOM if self._beta[fn] > 0.0 else 0.0  # no pressure slowdown: the bare peak
        mem = min(g.mem_units, max(1, g.mem_units_ceil(self._ws[inv] * (1 + room))))
        return Alloc(cpu, mem)

    # ------------------------------------------------------------ decisions
    def next_request(self) -> Request | None:
        """Advance the clock to the next arrival needing a decision; None when the trace is done."""
        arr = self._arr
        events = self._events
        while True:
            na = self._next_arrival
            if na < len(arr) and (not events or arr[na] <= events[0][0]):
                self.now = arr[na]
                self._next_arrival = na + 1
                fn = self._fn[na]
                st = self.stats[fn]
                st.on_arrival(self.now)
                gs = self.guards[fn]
                user = self._user[fn]
                g = self.decider.guard(user, gs)  # the simulator reports no usage or input size
                self._request = Request(na, fn, user, self.now, g, st, gs)
                return self._request
            if not events:
                return None
            t, inv = heapq.heappop(events)
            self.now = t
            self._finish(inv)

    def apply(self, alloc: Alloc) -> None:
        """Allocate the pending request and admit it (or queue it)."""
        req = self._request
        if req is None:
            raise RuntimeError("apply() without a pending request")
        self._request = None
        g = self.grid
        cpu, mem = alloc
        if not (1 <= cpu <= g.cpu_units and 1 <= mem <= g.mem_units):
            cpu = min(g.cpu_units, max(1, cpu))
            mem = min(g.mem_units, max(1, mem))
        inv = req.inv
        self.log.cpu[inv] = cpu
        self.log.mem[inv] = mem
        self._guard_of[inv] = req.guard
        if self._queue or not self._try_start(inv):
            self._queue.append(inv)
            self._queued_at[inv] = self.now

    def run_to_end(self) -> None:
        """Finish everything admitted or queued, admitting no new arrival (end of an episode)."""
        while self._events or self._queue:
            if not self._events:
                # Nothing runs, so the queue head fits anywhere (the grid fits every server).
                inv = self._queue.popleft()
                if not self._try_start(inv):
                    raise RuntimeError("an invocation fits no empty server")
                continue
            t, inv = heapq.heappop(self._events)
            self.now = t
            self._finish(inv)

    # ------------------------------------------------------------- internals
    def _try_start(self, inv: int, only: int = -1) -> bool:
        """Place and start ``inv``; ``only`` >= 0 restricts placement to that server."""
        fn = self._fn[inv]
        res = self.log
        mem_mb = res.mem[inv] * self._mu
        cores = res.cpu[inv] * self._cu
        oom = mem_mb < self._ws[inv]
        need_mem, need_cpu = mem_mb, cores
        if oom:  # an OOM-killed run is retried at the user's size: reserve the larger of the two
            user_mb, user_cores = self._umb[fn], self._ucores[fn]
            if user_mb > need_mem:
                need_mem = user_mb
            if user_cores > need_cpu:
                need_cpu = user_cores
        si, warm = self._place(fn, need_mem, need_cpu, only)
        if si < 0:
            return False
        if warm:
            cold = 0.0
        else:
            cold = self._cold[inv]
            self.cold_starts += 1
        s = self.servers[si]
        exec_s, base, load = self._duration(inv, fn, s.load, cores, mem_mb, oom)
        queued = self.now - self._queued_at.pop(inv, self.now)
        res.exec_s[inv] = exec_s
        res.baseline_s[inv] = base
        res.queue_s[inv] = queued
        res.cold_s[inv] = cold
        res.failed[inv] = oom
        res.reward[inv] = invocation_reward(exec_s, base, queued, cold, oom, self.reward_cfg)
        self.rewarded.append(inv)
        s.free_mem -= need_mem
        s.cpu_alloc += need_cpu
        s.load += load
        self.used_mem += need_mem
        self.used_load += load
        self._running[inv] = (si, need_mem, need_cpu, load)
        heapq.heappush(self._events, (self.now + cold + exec_s, inv))
        return True

    def _place(self, fn: int, need_mem: float, need_cpu: float, only: int) -> tuple[int, bool]:
        """(server, warm): a warm container of ``fn`` on a server with room first (taking it),
        else first fit from the function's home server (OpenWhisk-style), which then starts
        cold; server -1 when nothing fits. ``only`` >= 0 restricts it to that server."""
        cap_cpu = self._cap_cpu
        servers = self.servers
        keep_alive = self.cluster.keep_alive_s
        warm = self._warm[fn]
        for wi in list(warm):
            if only >= 0 and wi != only:
                continue
            idle = warm[wi]
            while idle and self.now - idle[0] > keep_alive:
                idle.pop(0)
            if not idle:
                del warm[wi]
                continue
            s = servers[wi]
            if s.free_mem >= need_mem and s.cpu_alloc + need_cpu <= cap_cpu:
                idle.pop()
                if not idle:
                    del warm[wi]
                return wi, True
        n = len(servers)
        home = fn % n
        for k in ((only - home) % n,) if only >= 0 else range(n):
            s = servers[(home + k) % n]
            if s.free_mem >= need_mem and s.cpu_alloc + need_cpu <= cap_cpu:
                return (home + k) % n, False
        return -1, False

    def _duration(
        self, inv: int, fn: int, server_load: float, cores: float, mem_mb: float, oom: bool
    ) -> tuple[float, float, float]:
        """(execution time, the same at the user's size, its load on the server) of ``inv`` at
        ``cores`` / ``mem_mb`` on a server already running ``server_load`` cores: the module's
        duration model, an OOM kill included (killed part-way, rerun at the user's size)."""
        phi = self._phi[fn]
        work = self._work[inv]
        cpu_s = cfs_cpu_time(work, cores, self._rate[fn], self._period, self._pen[fn])
        # Its load: the cores it uses on average, CPU share times the mean rate of its CPU part
        # (a burst within one period's quota runs at its full parallelism, above its quota).
        own = phi * work / cpu_s if cpu_s > 0.0 else 0.0
        own_user = phi * self._use_user[inv]
        server_cores = self.cluster.cores
        kappa = (server_load + own) / server_cores
        if kappa < 1.0:
            kappa = 1.0
        kappa_user = (server_load + own_user) / server_cores
        if kappa_user < 1.0:
            kappa_user = 1.0
        wait = self._dur[inv] * (1.0 - phi)
        base = wait + kappa_user * self._cpu_user[inv]
        run = wait + kappa * cpu_s
        if oom:
            # Dies part-way at the chosen size, then reruns at the user's size from a cold start.
            return OOM_AT * run + self._cold[inv] + base, base, own if own > own_user else own_user
        exec_s = run
        beta = self._beta[fn]
        if beta:  # memory pressure relative to the user's size (beta is 0 by default)
            ws = self._ws[inv]
            m = 1.0 + beta * _tightness(mem_mb, ws)
            exec_s *= m / (1.0 + beta * _tightness(self._umb[fn], ws))
        return exec_s, base, own

    def _finish(self, inv: int) -> None:
        si, need_mem, need_cpu, load = self._running.pop(inv)
        s = self.servers[si]
        s.free_mem += need_mem
        s.cpu_alloc -= need_cpu
        s.load -= load
        self.used_mem -= need_mem
        self.used_load -= load
        fn = self._fn[inv]
        self._warm[fn].setdefault(si, []).append(self.now)

        res = self.log
        cpu, mem = res.cpu[inv], res.mem[inv]
        failed = res.failed[inv]
        exec_s = res.exec_s[inv]
        cpu_peak = cpu * self._cu
        if self._par[fn] < cpu_peak:
            cpu_peak = self._par[fn]
        mem_peak = mem * self._mu
        if self._ws[inv] < mem_peak:
            mem_peak = self._ws[inv]
        res.cpu_peak[inv] = cpu_peak
        res.mem_peak[inv] = mem_peak
        gd = self._guard_of.pop(inv)
        self.guards[fn].observe(gd, Alloc(cpu, mem), cpu_peak, mem_peak, failed)
        at_user = cpu == self._ucpu[fn] and mem == self._umem[fn] and not failed
        self.stats[fn].on_completion(self.now, exec_s, cpu_peak, mem_peak, at_user_size=at_user)
        res.done[inv] = True
        self.finished.append(inv)
        self._drain_queue(si)

    def _drain_queue(self, server: int) -> None:
        """Start queued invocations on ``server``, the only one whose free resources grew."""
        q = self._queue
        if not q:
            return
        s = self.servers[server]
        g = self.grid
        cap_cpu = self.cluster.cores * self.cluster.cpu_overcommit
        if s.free_mem < g.mem_unit_mb or s.cpu_alloc + g.cpu_unit_cores > cap_cpu:
            return  # not even the smallest allocation fits
        cpu, mem = self.log.cpu, self.log.mem
        tried = 0
        kept: list[int] = []
        while q and tried < self.cluster.queue_scan:
            inv = q.popleft()
            tried += 1
            # Cheap pre-check on the allocation alone (an OOM retry may need more: _try_start
            # checks exactly) before the full placement attempt.
            if (
                s.free_mem < mem[inv] * g.mem_unit_mb
                or s.cpu_alloc + cpu[inv] * g.cpu_unit_cores > cap_cpu
                or not self._try_start(inv, only=server)
            ):
                kept.append(inv)
        q.extendleft(reversed(kept))
