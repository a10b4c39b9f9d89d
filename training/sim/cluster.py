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
set includes the warm worker's idle memory. Queued invocations do not progress; memory is
reserved at admission, CPU may be over-committed up to ``cpu_overcommit`` and then shows up as
contention. The constants are measured on real functions: docs/duration-model.md.

The node's give-back (its 100 ms tick raises a harvested resource to the user's size) is modelled
from the node's rules, one ``tick_s`` at a time:

* CPU: a harvested invocation that its quota throttles (or whose rate reaches the give-back
  threshold of its quota) runs the first tick at the harvested quota, staircase included, and
  the rest at the user's (``_cpu_time``).
* Memory grows linearly from the worker's idle memory at start to the working set at
  ``MEM_PEAK_AT`` of the run. A working set above a harvested limit is saved when the limit is
  reached at least one tick after usage crossed the give-back threshold of it (the sample that
  sees it comes within a tick; the worst phase is assumed), else the run is OOM-killed where it
  reaches the limit and retried at the user's size (a failure). A spike's extra memory is
  allocated at once (``Workload.spike``): no usage give-back saves it. With ``oom_hold`` (the
  node's ``v1_memory_harvest = "hold"``) a run that would be killed waits at the limit instead,
  a whole tick, and runs on at the user's size: its execution time grows by the tick and its
  memory is held at the harvest until then. The tick is a bound: the node, woken by the
  kernel's OOM notification, gives the memory back within milliseconds.

A run that will give back reserves the user's size at admission, as an OOM retry does: the tick it
runs harvested is not worth an event. ``Log.give_backs`` counts the resources given back and
``cpu_held`` / ``mem_held`` the core- and MB-seconds held, give-backs included. The reward
(``sidecar.core.reward``) is known when an invocation finishes: it includes the admission queue's
waiting while it ran, attributed to the running invocations in proportion to what they hold above
(or below: a credit) the user's size, per MB and per core of everything held (``_advance``
integrates the queue's length over the memory and the cores held, O(1) per event).
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
MEM_PEAK_AT = 0.5
"""Share of its run at which an invocation's memory reaches its working set, growing linearly from
the worker's idle memory (a spike: allocated at once at that point). A limit below the working
set is reached, and the run OOM-killed, at most this far into it."""


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
    tick_s: float = 0.1
    """The sidecar's sampling tick: a give-back takes effect at most this long after the usage
    that calls for it, and a burst shorter than a tick shows the samples its work over the tick."""
    give_back: bool = True
    """Model the node's give-back (module docstring). Off: limits stay as decided for the whole
    run, as in the measured curves of docs/duration-model.md."""
    oom_hold: bool = True
    """Model ``[actuation] v1_memory_harvest = "hold"``, a node's default: a run that reaches a
    harvested memory limit below its working set, where the usage give-back comes too late (a
    spike, fast growth), waits there one tick and runs on at the user's size instead of being
    OOM-killed (module docstring). Needs ``give_back``. False: the reference's hard limit."""
    restart_every_s: float = 0.0
    """Every node restarts each this many seconds and forgets what it learned about every
    function, as a sidecar without ``[actuation] profiles_file`` does: each function's statistics
    and safeguard state start over. 0: never, or a node that keeps its profiles
    (docs/sidecar.md, "What a restart remembers")."""


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
    input_size: float
    """What the invoker reports (``Workload.input_size``): the input floor and the features."""


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
    "give_backs",
    "cpu_held",
    "mem_held",
    "caused_s",
    "cpu_s",
)


class Log:
    """Per-invocation outcomes while the run goes on: plain lists, written on the hot path.

    Managers read single entries from here (``sim.log.exec_s[inv]``); whole-run analysis uses
    the numpy snapshot ``sim.results``. NaN / 0 until an invocation has started or finished
    (``reward`` and ``caused_s``: finished). ``give_backs``: resources given back (0-2);
    ``cpu_held`` / ``mem_held``: core- / MB-seconds held over its execution time; ``caused_s``:
    the queue's waiting attributed to it (negative: a credit); ``cpu_s``: its CPU work in
    core-seconds (what a node's ``cpuacct`` counts).
    """

    __slots__ = ("fn", *_FIELDS)

    def __init__(self, wl: Workload) -> None:
        n = wl.n_invocations
        nan = float("nan")
        self.fn: list[int] = wl.fn.tolist()
        self.cpu = [0] * n
        self.mem = [0] * n
        for name in (
            "exec_s",
            "baseline_s",
            "queue_s",
            "cold_s",
            "cpu_peak",
            "mem_peak",
            "reward",
            "cpu_held",
            "mem_held",
            "caused_s",
            "cpu_s",
        ):
            setattr(self, name, [nan] * n)
        self.failed = [False] * n
        self.done = [False] * n
        self.give_backs = [0] * n


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
    give_backs: np.ndarray = field(repr=False)
    cpu_held: np.ndarray = field(repr=False)
    mem_held: np.ndarray = field(repr=False)
    caused_s: np.ndarray = field(repr=False)
    cpu_s: np.ndarray = field(repr=False)

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


def cfs_work_within(time: float, cores: float, rate: float, period: float, penalty: float) -> float:
    """The CPU work (core-seconds) ``cfs_cpu_time``'s staircase does in its first ``time`` seconds
    (for a run that lasts longer): whole throttled periods of ``period * penalty`` each do one
    period's quota, the partial one runs at ``rate`` until its quota is spent."""
    if rate <= cores:
        return time * rate
    step = period * penalty
    k = math.floor(time / step)
    budget = cores * period
    last = (time - k * step) * rate
    return k * budget + (last if last < budget else budget)


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


def _held(alloc: float, user: float, until: float, total: float) -> float:
    """Resource-seconds of ``alloc`` held for ``until`` seconds of ``total``, the user's size
    after."""
    if until >= total:
        return alloc * total
    return alloc * until + user * (total - until)


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
        self._input = workload.input_size.tolist()
        self._spike = workload.spike.tolist()
        self._worker = workload.worker_mb.tolist()
        self._tick = cluster.tick_s
        self._give_back = cluster.give_back
        self._hold = cluster.oom_hold and cluster.give_back
        self._gb_thr = safeguard.give_back_threshold
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
        self.used_cpu = 0.0
        # The queue's length integrated over time, per MB and per core held (``_advance``).
        self._acc_mem = 0.0
        self._acc_cpu = 0.0
        self._forget()
        every = c.restart_every_s
        self._next_restart = every if every > 0.0 else math.inf
        self.restarts = 0
        self.log = Log(self.wl)
        # fn -> {server: idle-since times of its warm containers there, oldest first}
        self._warm: list[dict[int, list[float]]] = [{} for _ in range(self.wl.n_functions)]
        self.cold_starts = 0
        self._next_arrival = 0
        self._events: list[tuple[float, int]] = []  # (finish time, invocation)
        self._queue: deque[int] = deque()
        self._queued_at: dict[int, float] = {}
        # inv -> server, mem and cpu reserved, load, warm start, the queue accumulators at start
        self._running: dict[int, tuple[int, float, float, float, bool, float, float]] = {}
        self._guard_of: dict[int, Guard] = {}
        self._request: Request | None = None
        self.finished: list[int] = []
        """Invocations finished since the caller last cleared this list (managers observe them)."""
        self.rewarded: list[int] = []
        """Invocations whose reward became known since the caller last cleared this list: at
        their end, when the queueing they caused others is known too (a learner credits each to
        its decision by invocation id; an episode drains at its end, so none is lost)."""

    def _forget(self) -> None:
        """What each function's nodes know about it starts over (a start, or a restart)."""
        self.stats = [FunctionStats() for _ in range(self.wl.n_functions)]
        self.guards = [SafeguardState() for _ in range(self.wl.n_functions)]

    @property
    def results(self) -> Results:
        """The run so far as numpy arrays (a snapshot: build it once, after the run)."""
        return Results.of(self.log)

    def node_state(self) -> NodeState:
        """What is free as a node's engine counts it: capacity minus what the running invocations
        are allocated (not the cores they use: a policy must see here what it sees on a host)."""
        return NodeState(
            total_cores=self.total_cores,
            total_mem_mb=self.total_mem,
            free_cores=self.total_cores - self.used_cpu,
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
        """Advance the clock to the next arrival needing a decision; None when the trace is done.

        The guard gets the invocation's input and the memory its container holds at start, as a
        node's hook reports them: the warm worker's idle memory when the function has a warm
        container now, 0 for a new one."""
        arr = self._arr
        events = self._events
        while True:
            na = self._next_arrival
            if na < len(arr) and (not events or arr[na] <= events[0][0]):
                if arr[na] >= self._next_restart:
                    while arr[na] >= self._next_restart:
                        self._next_restart += self.cluster.restart_every_s
                        self.restarts += 1
                    self._forget()
                self._advance(arr[na])
                self._next_arrival = na + 1
                fn = self._fn[na]
                st = self.stats[fn]
                st.on_arrival(self.now)
                gs = self.guards[fn]
                user = self._user[fn]
                size = self._input[na]
                usage = self._worker[fn] if self._has_warm(fn) else 0.0
                g = self.decider.guard(user, gs, usage, size, len(self._queue))
                self._request = Request(na, fn, user, self.now, g, st, gs, size)
                return self._request
            if not events:
                return None
            t, inv = heapq.heappop(events)
            self._advance(t)
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
            self._advance(t)
            self._finish(inv)

    # ------------------------------------------------------------- internals
    def _advance(self, t: float) -> None:
        """Move the clock to ``t``, first adding the queue's waiting since the last move, per MB
        and per core held, to the accumulators the caused-queueing charge reads (``_finish``)."""
        q = len(self._queue)
        if q:
            dt = t - self.now
            if self.used_mem > 0.0:
                self._acc_mem += q * dt / self.used_mem
            if self.used_cpu > 0.0:
                self._acc_cpu += q * dt / self.used_cpu
        self.now = t

    def _has_warm(self, fn: int) -> bool:
        """Whether ``fn`` has an idle warm container now (on any server)."""
        keep_alive = self.cluster.keep_alive_s
        for idle in self._warm[fn].values():
            if idle and self.now - idle[-1] <= keep_alive:
                return True
        return False

    def _try_start(self, inv: int, only: int = -1) -> bool:
        """Place and start ``inv``; ``only`` >= 0 restricts placement to that server."""
        fn = self._fn[inv]
        res = self.log
        mem_mb = res.mem[inv] * self._mu
        cores = res.cpu[inv] * self._cu
        user_mb, user_cores = self._umb[fn], self._ucores[fn]
        cpu_s, cpu_back = self._cpu_time(inv, fn, cores)
        ws = self._ws[inv]
        kill = mem_back = -1.0  # share of the run at the OOM kill; seconds to the memory give-back
        hold = -1.0  # share of the run at which it waits a tick at its harvested limit
        if mem_mb < ws:
            mem_back = self._mem_give_back(inv, fn, mem_mb, cpu_s)
            if mem_back < 0.0:
                w = self._worker[fn]
                reach = MEM_PEAK_AT
                if not self._spike[inv]:
                    grown = (mem_mb - w) / (ws - w) if ws > w else 0.0
                    reach *= grown if grown > 0.0 else 0.0
                if self._hold and mem_mb < user_mb:
                    hold = reach
                else:
                    kill = reach
        # An OOM-killed run is retried at the user's size and a give-back raises a resource to
        # it: reserve the larger of the two.
        need_mem, need_cpu = mem_mb, cores
        if (kill >= 0.0 or mem_back >= 0.0 or hold >= 0.0) and user_mb > need_mem:
            need_mem = user_mb
        if (kill >= 0.0 or cpu_back) and user_cores > need_cpu:
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
        exec_s, base, load, run = self._duration(inv, fn, s.load, cpu_s, mem_mb, kill)
        if hold >= 0.0:  # it waits at the limit until the node gives the user's memory back
            mem_back = hold * run + self._tick
            exec_s += self._tick
        res.exec_s[inv] = exec_s
        res.baseline_s[inv] = base
        res.queue_s[inv] = self.now - self._queued_at.pop(inv, self.now)
        res.cold_s[inv] = cold
        res.failed[inv] = oom = kill >= 0.0
        # Resource-seconds held: the chosen size until a kill or a give-back, the user's after.
        if oom or cpu_back or mem_back >= 0.0:
            cpu_until = kill * run if oom else (self._tick if cpu_back else exec_s)
            mem_until = kill * run if oom else (mem_back if mem_back >= 0.0 else exec_s)
            res.cpu_held[inv] = _held(cores, user_cores, cpu_until, exec_s)
            res.mem_held[inv] = _held(mem_mb, user_mb, mem_until, exec_s)
            res.give_backs[inv] = 0 if oom else int(cpu_back) + (mem_back >= 0.0)
        else:
            res.cpu_held[inv] = cores * exec_s
            res.mem_held[inv] = mem_mb * exec_s
        res.cpu_s[inv] = self._work[inv]
        # What the node's samples would show: the quota it ran at (the user's after a give-back).
        quota = user_cores if cpu_back else cores
        res.cpu_peak[inv] = self._cpu_peak(inv, fn, quota, run)
        res.mem_peak[inv] = mem_mb if oom else ws  # killed at its limit
        s.free_mem -= need_mem
        s.cpu_alloc += need_cpu
        s.load += load
        self.used_mem += need_mem
        self.used_cpu += need_cpu
        self._running[inv] = (si, need_mem, need_cpu, load, warm, self._acc_mem, self._acc_cpu)
        heapq.heappush(self._events, (self.now + cold + exec_s, inv))
        return True

    def _cpu_time(self, inv: int, fn: int, cores: float) -> tuple[float, bool]:
        """(CPU time in isolation, whether the CPU was given back) of ``inv`` at ``cores``.

        A harvested run that its quota throttles runs the first tick at it and the rest at the
        user's quota; one whose rate reaches the give-back threshold of its quota for longer than
        a tick is given the user's size back too (its time is unchanged: nothing throttled it).
        """
        work, rate, pen, period = self._work[inv], self._rate[fn], self._pen[fn], self._period
        cpu_s = cfs_cpu_time(work, cores, rate, period, pen)
        user_cores = self._ucores[fn]
        tick = self._tick
        if cores >= user_cores or cpu_s <= tick or not self._give_back:
            return cpu_s, False
        if rate > cores and work > cores * period:  # throttled
            done = cfs_work_within(tick, cores, rate, period, pen)
            return tick + cfs_cpu_time(work - done, user_cores, rate, period, pen), True
        return cpu_s, rate >= self._gb_thr * cores

    def _mem_give_back(self, inv: int, fn: int, limit: float, cpu_s: float) -> float:
        """Seconds into the run at which a memory give-back saves ``inv`` from its harvested
        ``limit`` (below its working set), or -1 when it is OOM-killed (module docstring; times
        from its run in isolation)."""
        user_mb = self._umb[fn]
        if self._spike[inv] or limit >= user_mb or not self._give_back:
            return -1.0
        w, ws = self._worker[fn], self._ws[inv]
        ramp = MEM_PEAK_AT * (self._dur[inv] * (1.0 - self._phi[fn]) + cpu_s)
        if ramp <= 0.0 or ws <= w:
            return -1.0
        per_mb = ramp / (ws - w)  # seconds per MB of growth
        warn = (self._gb_thr * limit - w) * per_mb
        back = (warn if warn > 0.0 else 0.0) + self._tick
        return back if (limit - w) * per_mb >= back else -1.0

    def _cpu_peak(self, inv: int, fn: int, quota: float, run: float) -> float:
        """The CPU peak a node's samples report for ``inv`` at ``quota`` cores in a ``run`` of that
        many seconds: its quota when throttled, else its rate while its CPU part fills a tick;
        the work of a shorter burst over the tick, or over the whole invocation when that is
        shorter still (the node's end-of-invocation average)."""
        work, rate = self._work[inv], self._rate[fn]
        if rate > quota and work > quota * self._period:
            return quota
        tick = self._tick
        span = work / rate if rate > 0.0 else 0.0
        if span < tick:
            span = tick if run > tick else run
        return work / span if span > 0.0 else 0.0

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
        self, inv: int, fn: int, server_load: float, cpu_s: float, mem_mb: float, kill: float
    ) -> tuple[float, float, float, float]:
        """(execution time, the same at the user's size, its load on the server, its run at the
        chosen size) of ``inv`` with CPU time ``cpu_s`` in isolation and ``mem_mb`` on a server
        already running ``server_load`` cores: the module's duration model. ``kill`` >= 0: it is
        OOM-killed that share into its run, then reruns at the user's size from a cold start."""
        phi = self._phi[fn]
        work = self._work[inv]
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
        if kill >= 0.0:
            load = own if own > own_user else own_user
            return kill * run + self._cold[inv] + base, base, load, run
        exec_s = run
        beta = self._beta[fn]
        if beta:  # memory pressure relative to the user's size (beta is 0 by default)
            ws = self._ws[inv]
            m = 1.0 + beta * _tightness(mem_mb, ws)
            exec_s *= m / (1.0 + beta * _tightness(self._umb[fn], ws))
        return exec_s, base, own, run

    def _finish(self, inv: int) -> None:
        si, need_mem, need_cpu, load, warm, acc_mem, acc_cpu = self._running.pop(inv)
        s = self.servers[si]
        s.free_mem += need_mem
        s.cpu_alloc -= need_cpu
        s.load -= load
        self.used_mem -= need_mem
        self.used_cpu -= need_cpu
        fn = self._fn[inv]
        self._warm[fn].setdefault(si, []).append(self.now)

        res = self.log
        user_mb, user_cores = self._umb[fn], self._ucores[fn]
        # The queue's waiting while it ran, attributed by what it held above the user's size.
        caused = 0.5 * (
            (need_mem - user_mb) * (self._acc_mem - acc_mem)
            + (need_cpu - user_cores) * (self._acc_cpu - acc_cpu)
        )
        res.caused_s[inv] = caused
        exec_s, base, failed = res.exec_s[inv], res.baseline_s[inv], res.failed[inv]
        res.reward[inv] = invocation_reward(
            exec_s,
            base,
            res.queue_s[inv],
            res.cold_s[inv],
            failed,
            self.reward_cfg,
            cpu_held=res.cpu_held[inv] / (user_cores * base),  # held_ratio(); base > 0
            mem_held=res.mem_held[inv] / (user_mb * base),
            caused_queue_s=caused,
        )
        self.rewarded.append(inv)
        cpu, mem = res.cpu[inv], res.mem[inv]
        cpu_peak, mem_peak = res.cpu_peak[inv], res.mem_peak[inv]
        size = self._input[inv]
        gd = self._guard_of.pop(inv)
        self.guards[fn].observe(
            gd,
            Alloc(cpu, mem),
            cpu_peak,
            mem_peak,
            failed,
            size,
            self._worker[fn] if warm else 0.0,
            res.cpu_s[inv],
            exec_s,
            self._period,
            user_mb,
        )
        at_user = gd.sets_baseline(Alloc(cpu, mem), self.user_alloc(fn), failed)
        self.stats[fn].on_completion(
            self.now, exec_s, cpu_peak, mem_peak, at_user_size=at_user, input_size=size
        )
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
