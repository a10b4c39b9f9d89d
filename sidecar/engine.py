"""Per-invocation decisions on a host: pure logic, no I/O, no asyncio.

The engine decides through ``sidecar.core.decision.Decider`` as the simulator's managers do:
``stats.on_arrival`` -> ``Decider.decide`` (the guard with the container's current memory usage
and the reported input size, features, scores, argmax; the model-free rule when the model fails)
-> allocation; and at the end ``SafeguardState.observe`` + ``FunctionStats.on_completion`` with
the peaks the sampler measured, then the reward. On top it keeps what only a host has: give-back
within an invocation, OOM kills, inferred boundaries from CPU activity, the allocation trace and
trajectory records.

Decisions the spec left open, documented here:
* Targets are per resource: a resource decided at the user's grid point gets the user's *exact*
  value (``None`` in ``Target`` = "the user's own limit"), so a user size off the grid is never
  rounded on a safeguard run or a restore.
* Memory: v1 harvests with the hard limit (``memory.limit_in_bytes``, the floor applies; with
  ``[actuation] v1_memory_harvest = "hold"`` a task that outgrows it waits instead of being
  OOM-killed), or with ``"soft"`` keeps it at the user's size and harvests with
  ``memory.soft_limit_in_bytes``; v2 keeps ``memory.max`` at the user's size and harvests with
  ``memory.high`` (throttles, never kills).
* An invocation that ends as a failure after its memory reached a harvested hard limit counts
  as ``oom`` although nothing was killed: under the OOM hold an allocation the kernel makes for
  a syscall (a read() into a fresh buffer) fails at the limit rather than wait.
* Give-backs: within an invocation a harvested resource returns to the user's size at once, for
  one of three reasons: ``oom_hold`` (memory: a task waits at the harvested hard limit),
  ``usage`` (the window's mean usage reached ``give_back_threshold`` of the
  allocation) or, for CPU, ``throttled`` (more than ``[actuation] throttle_target`` of the CFS
  periods since the last look were throttled: the fast half of two-timescale control, the
  policy's per-invocation decision being the slow half). One step, all the way to the user's
  size, as Autothrottle undoes a cut on its next tick: an invocation lasts a few ticks, and a
  half step would cost another throttled tick of it.
* Reward: ``invocation_reward(duration, baseline before this run)`` with the core- and
  MB-seconds the invocation held (its allocation until each give-back, the user's size after:
  ``held_seconds``, also in its trace and the end hook's answer) relative to the user's size; a
  node has no admission queue, so no queueing caused to others. With no baseline yet (the first
  safeguard run, or failures before any), the reward is ``None`` and the record says so: the
  trainer skips it (there is nothing to compare with). A ``lost`` run (daemon shutdown,
  container removed mid-run) also gets ``None``: its end is not the policy's doing.
* After an invocation ends the container returns to the user's size (``restore_on_end``), so an
  idle container never sits harvested while nobody watches its demand.
* Node state: free = capacity - allocations of running invocations (as the simulator counts it);
  pending = what the hook reports (0 by default).
* Inferred boundaries: a container never reported by a hook starts an invocation on the first
  window whose CPU rate reaches ``busy_cores`` and ends it after ``idle_ticks`` quiet windows; its
  start and end times are window edges (good to one tick).
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from sidecar.cgroups import Usage
from sidecar.config import ActuationConfig, BoundaryConfig
from sidecar.core.decision import Decider
from sidecar.core.features import NodeState
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.policy import Scorer, fallback_scorer
from sidecar.core.record import OUTCOMES, Record
from sidecar.core.reward import RewardConfig, held_ratio, invocation_reward
from sidecar.core.safeguard import (
    FAILURE,
    FIRST,
    Guard,
    SafeguardConfig,
    SafeguardState,
    give_back_needed,
)
from sidecar.core.stats import FunctionStats
from sidecar.runtimes.base import ContainerRef, UserSize
from sidecar.units import MB

MAX_FUNCTIONS = 10_000
"""Per-function state kept (least recently used functions are forgotten beyond it)."""


class Target(NamedTuple):
    """Limits to apply; ``None`` means the user's own value for that knob."""

    cpu_cores: float | None = None
    cpu_weight: int | None = None
    mem_limit_bytes: int | None = None
    mem_high_bytes: int | None = None
    cpu_period_us: int | None = None
    """With ``cpu_cores``: its CFS period; None = ``[actuation] cpu_period_us``."""

    @property
    def is_user(self) -> bool:
        return self == USER_TARGET


USER_TARGET = Target()
USAGE = "usage"
THROTTLED = "throttled"
OOM_HOLD = "oom_hold"
"""Why a give-back happened (``GiveBack.reasons``, the trace's ``give_backs[].reason``)."""


def plan_target(
    grid: ResourceGrid,
    user: UserSize,
    user_alloc: Alloc,
    alloc: Alloc,
    cgroup_version: int,
    cfg: ActuationConfig,
    function: str = "",
) -> Target:
    """Physical limits for a decided allocation (pure); a harvested quota of a ``function`` with
    an ``[[actuation.harvest_periods]]`` entry gets that CFS period."""
    cpu_cores = cpu_weight = mem_limit = mem_high = period = None
    if alloc.cpu != user_alloc.cpu:
        cpu_cores = grid.cores(alloc.cpu)
        if cfg.scale_weight:
            cpu_weight = max(1, min(10_000, round(user.cpu_weight * cpu_cores / user.cpu_cores)))
        if cpu_cores < user.cpu_cores:
            period = cfg.harvest_period_us(function)
    if alloc.mem != user_alloc.mem:
        chosen = int(grid.mb(alloc.mem) * MB)
        if chosen > user.mem_bytes:
            mem_limit = chosen
            if cgroup_version == 2:
                mem_high = chosen
        elif chosen < user.mem_bytes and cfg.harvest_memory:
            if cgroup_version == 2 or cfg.v1_memory_harvest == "soft":
                mem_high = chosen  # the hard limit stays at the user's size: never a kill
            else:
                mem_limit = chosen
    return Target(cpu_cores, cpu_weight, mem_limit, mem_high, period)


def effective(user: UserSize, target: Target) -> tuple[float, int]:
    """(cores, memory bytes) a target lets a container use before throttling."""
    cores = user.cpu_cores if target.cpu_cores is None else target.cpu_cores
    mem = user.mem_bytes
    if target.mem_limit_bytes is not None:
        mem = target.mem_limit_bytes
    if target.mem_high_bytes is not None:
        mem = min(mem, target.mem_high_bytes)
    return cores, mem


@dataclass
class Invocation:
    id: str
    container_id: str
    function: str
    user: UserSize
    user_alloc: Alloc
    alloc: Alloc
    guard: Guard
    target: Target
    action: int
    logp: float
    ctx: np.ndarray
    cpu_block: np.ndarray
    mem_block: np.ndarray
    model: str
    start_s: float
    wall_start_s: float
    decision_s: float
    inferred: bool = False
    cpu_s_at_start: float = math.nan
    cpu_peak_cores: float = 0.0
    mem_peak_bytes: int = 0
    mem_start_bytes: int = 0
    input_size: float | None = None
    """As the invoker reported it: with the usage at start it feeds the safeguard's input floor."""
    oom: bool = False
    """The kernel OOM-killed a task in its container while it ran."""
    oom_kills_at_start: int = -1
    """The container's cumulative kill count when it started (-1: unknown): a kill counted
    later happened during it, one already counted before it (an earlier run's, or while idle)."""
    mem_wall_bytes: int = 0
    """The harvested hard memory limit it ran under until a give-back (0: none)."""
    throttle_start: tuple[int, int] | None = None
    """(cpu.stat nr_periods, nr_throttled) at the start, when read then."""
    throttle_mark: tuple[int, int] | None = None
    """The same counters where the throttle give-back last looked."""
    samples: int = 0
    """Ticks that sampled its container so far (a give-back's trace entry names its tick)."""
    given_back: set[str] = field(default_factory=set)
    fallback: str | None = None
    trace: dict = field(default_factory=dict)

    @property
    def mem_harvested(self) -> bool:
        """Its decision gave it less memory than its user's: a kill in it is the harvest's."""
        return self.trace["chosen"]["mem_bytes"] < self.user.mem_bytes

    @property
    def cpu_harvested(self) -> bool:
        """Its CPU quota is below the user's and not given back: the throttle give-back watches
        it (the sampler reads its throttling counters every tick)."""
        cores = self.target.cpu_cores
        return cores is not None and cores < self.user.cpu_cores


@dataclass
class ManagedContainer:
    ref: ContainerRef
    hook_user: UserSize | None = None
    """The latest user size a hook reported at a start (the actuator saved it and restores to
    it); a start that reports none is decided against it too. None: the ref's."""
    active: Invocation | None = None
    hooked: bool = False
    """A hook reported an invocation here: no inference for this container."""
    last_mem_bytes: int = 0
    oom_kills: int = -1
    """The cumulative kill count up to which kills were reported (an ``OomKill``, by a tick or
    by the end of the run they killed): a later read of no higher a count reports none again.
    -1: none reported yet."""
    quiet_ticks: int = 0
    last_busy_s: float = math.nan
    window_start_s: float = math.nan

    @property
    def user(self) -> UserSize:
        """The user's size as the actuator knows it: what decisions are made against."""
        return self.hook_user or self.ref.user


class GiveBack(NamedTuple):
    container_id: str
    invocation_id: str
    resources: tuple[str, ...]
    target: Target
    reasons: tuple[str, ...]
    """USAGE or THROTTLED, one per resource."""


class InferredStart(NamedTuple):
    container_id: str
    start_s: float


class InferredEnd(NamedTuple):
    invocation_id: str
    end_s: float


class OomKill(NamedTuple):
    container_id: str
    kills: int
    invocation_id: str | None
    harvested: bool = False
    """The killed run's decision gave it less memory than its user's."""


Effect = GiveBack | InferredStart | InferredEnd | OomKill


@dataclass
class Ended:
    invocation: Invocation
    outcome: str
    duration_s: float
    reward: float | None
    rfet: float | None
    record: dict
    """The trajectory record, packed (``Record.pack``): what the spool stores."""
    oom: OomKill | None = None
    """Kills in the run that its end's own read found first (no tick had reported them)."""


class EngineError(Exception):
    status = 400


class UnknownContainer(EngineError):
    status = 404


class UnknownInvocation(EngineError):
    status = 404


class Busy(EngineError):
    status = 409


class Engine:
    def __init__(
        self,
        grid: ResourceGrid,
        *,
        node_id: str,
        host_cores: float,
        host_mem_mb: float,
        scorer: Callable[[], tuple[Scorer, str]],
        fallback: Scorer | None = None,
        safeguard: SafeguardConfig = SafeguardConfig(),
        reward: RewardConfig = RewardConfig(),
        actuation: ActuationConfig = ActuationConfig(),
        boundaries: BoundaryConfig = BoundaryConfig(),
        tick_s: float = 0.1,
        trace_size: int = 2000,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.grid = grid
        self.decider = Decider(grid, safeguard)
        self.node_id = node_id
        self.host_cores = host_cores
        self.host_mem_mb = host_mem_mb
        self.scorer = scorer
        self.fallback = fallback_scorer() if fallback is None else fallback
        """The model-free rule that decides when the scorer fails (``[model] rule``)."""
        self.reward_cfg = reward
        self.act_cfg = actuation
        self.bounds = boundaries
        self.tick_s = tick_s
        self.clock = clock
        self.wall = wall
        self.containers: dict[str, ManagedContainer] = {}
        self.invocations: dict[str, Invocation] = {}
        self.stats: OrderedDict[str, FunctionStats] = OrderedDict()
        self.guards: OrderedDict[str, SafeguardState] = OrderedDict()
        self.trace: deque[dict] = deque(maxlen=trace_size)
        self._seq = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self.model_failures = 0
        self.consecutive_model_failures = 0

    @property
    def sg_cfg(self) -> SafeguardConfig:
        """The safeguard's configuration, the decider's (a reload replaces it)."""
        return self.decider.cfg

    @sg_cfg.setter
    def sg_cfg(self, cfg: SafeguardConfig) -> None:
        self.decider.cfg = cfg

    # ------------------------------------------------------------------------ containers
    def add_container(self, ref: ContainerRef) -> None:
        c = self.containers.get(ref.id)
        if c is None:
            self.containers[ref.id] = ManagedContainer(ref)
        else:  # a new configured size replaces whatever a hook reported, as in the actuator
            c.ref, c.hook_user = ref, None

    def remove_container(self, container_id: str) -> Invocation | None:
        """Forget a container; returns its running invocation (the caller ends it as lost)."""
        c = self.containers.pop(container_id, None)
        return c.active if c else None

    def remember(self, functions: Mapping[str, tuple[FunctionStats, SafeguardState]]) -> None:
        """At start-up: take the per-function state an earlier run kept (``sidecar.profiles``),
        least recently used first; a function this run has already seen keeps its own."""
        mine = list(self.stats)
        for name, (st, gs) in functions.items():
            if name not in self.stats:
                self.stats[name], self.guards[name] = st, gs
        for name in mine:  # this run's are the most recently used
            self.stats.move_to_end(name)
            self.guards.move_to_end(name)
        self._forget_oldest()

    def _forget_oldest(self) -> None:
        while len(self.stats) > MAX_FUNCTIONS:
            old, _ = self.stats.popitem(last=False)
            self.guards.pop(old, None)

    def _function(self, name: str) -> tuple[FunctionStats, SafeguardState]:
        st = self.stats.get(name)
        if st is None:
            st = self.stats[name] = FunctionStats()
            self.guards[name] = SafeguardState()
            self._forget_oldest()
        else:
            self.stats.move_to_end(name)
            self.guards.move_to_end(name)
        return st, self.guards[name]

    def node_state(self, pending: int = 0) -> NodeState:
        used_cores = used_mb = 0.0
        for inv in self.invocations.values():
            cores, mem = effective(inv.user, inv.target)
            used_cores += cores
            used_mb += mem / MB
        return NodeState(
            total_cores=self.host_cores,
            total_mem_mb=self.host_mem_mb,
            free_cores=self.host_cores - used_cores,
            free_mem_mb=self.host_mem_mb - used_mb,
            pending=pending,
        )

    # ------------------------------------------------------------------------ decisions
    def start(
        self,
        container_id: str,
        *,
        function: str | None = None,
        user: UserSize | None = None,
        pending: int = 0,
        input_size: float | None = None,
        invocation_id: str | None = None,
        inferred: bool = False,
        usage: Usage | None = None,
        now_s: float | None = None,
    ) -> Invocation:
        c = self.containers.get(container_id)
        if c is None:
            raise UnknownContainer(f"unknown container {container_id!r}")
        if c.active is not None:
            raise Busy(f"container {container_id!r} already runs invocation {c.active.id}")
        if invocation_id is not None and invocation_id in self.invocations:
            raise Busy(f"invocation {invocation_id!r} is already running")
        if not inferred:
            c.hooked = True
        t0 = time.perf_counter()
        now = self.clock() if now_s is None else now_s
        if user is not None:
            c.hook_user = user
        user = c.user
        fn = function or c.ref.function
        user_alloc = self.grid.nearest(user.cpu_cores, user.mem_bytes / MB)
        stats, gs = self._function(fn)
        stats.on_arrival(now)
        mem_usage = usage.mem_bytes if usage is not None else c.last_mem_bytes
        scorer, model = self.scorer()
        d = self.decider.decide(
            scorer,
            self.node_state(pending),
            stats,
            gs,
            user_alloc,
            now,
            mem_usage_mb=mem_usage / MB,
            input_size=input_size,
            fallback=self.fallback,
        )
        if d.fallback is None:
            self.consecutive_model_failures = 0
        else:  # a model must never stop a decision: the rule decided
            self.model_failures += 1
            self.consecutive_model_failures += 1
            model = "fallback"
        alloc = self.grid.allocs[d.action]  # the grid keeps every candidate's Alloc
        target = plan_target(
            self.grid, user, user_alloc, alloc, c.ref.cgroup_version, self.act_cfg, fn
        )
        decision_s = time.perf_counter() - t0
        inv = Invocation(
            id=invocation_id or f"{self._prefix}-{next(self._seq)}",
            container_id=container_id,
            function=fn,
            user=user,
            user_alloc=user_alloc,
            alloc=alloc,
            guard=d.guard,
            target=target,
            action=d.action,
            logp=d.logp,
            ctx=d.obs.context,
            cpu_block=d.obs.cpu,
            mem_block=d.obs.mem,
            model=model,
            start_s=now,
            wall_start_s=self.wall(),
            decision_s=decision_s,
            inferred=inferred,
            cpu_s_at_start=usage.cpu_usage_s if usage is not None else math.nan,
            mem_peak_bytes=mem_usage,
            mem_start_bytes=mem_usage,
            input_size=input_size,
            fallback=d.fallback,
            throttle_start=None if usage is None else (usage.nr_periods, usage.nr_throttled),
            oom_kills_at_start=-1 if usage is None else usage.oom_kills,
        )
        inv.throttle_mark = inv.throttle_start
        inv.trace = trace_entry(inv)
        self.trace.append(inv.trace)
        c.active = inv
        self.invocations[inv.id] = inv
        return inv

    def end(
        self,
        invocation_id: str,
        outcome: str = "success",
        *,
        duration_s: float | None = None,
        usage: Usage | None = None,
        now_s: float | None = None,
        learn: bool = True,
    ) -> Ended:
        """End an invocation: learn from it, credit its decision, build its record.

        ``learn=False`` is for a run the daemon cuts short itself (``lost`` at shutdown): it says
        nothing of the function's needs, so only a kill the kernel reported in it is learned."""
        if outcome not in OUTCOMES:
            raise EngineError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        inv = self.invocations.pop(invocation_id, None)
        if inv is None:
            raise UnknownInvocation(f"unknown invocation {invocation_id!r}")
        c = self.containers.get(inv.container_id)
        if c is not None and c.active is inv:
            c.active = None
        now = self.clock() if now_s is None else now_s
        duration = max(0.0, now - inv.start_s) if duration_s is None else duration_s
        cpu_s = 0.0  # its CPU work, when the usage at both ends is known (the burst rule)
        oom = None
        if usage is not None:
            self._observe_usage(inv, usage.mem_bytes, usage.mem_peak_bytes)
            window = now - inv.start_s
            if inv.cpu_s_at_start == inv.cpu_s_at_start and window > 0:
                # short invocations see no full sampling window: their mean rate is the peak
                cpu_s = max(0.0, usage.cpu_usage_s - inv.cpu_s_at_start)
                inv.cpu_peak_cores = max(inv.cpu_peak_cores, cpu_s / window)
            if c is not None:
                c.last_mem_bytes = usage.mem_bytes
            if 0 <= inv.oom_kills_at_start < usage.oom_kills:  # counted before a tick saw it
                inv.oom = True
                reported = max(inv.oom_kills_at_start, c.oom_kills if c is not None else -1)
                if usage.oom_kills > reported:  # reported here, once: the next tick's read is not
                    oom = OomKill(
                        inv.container_id,
                        usage.oom_kills - reported,
                        inv.id,
                        inv.mem_harvested,
                    )
                    if c is not None:
                        c.oom_kills = usage.oom_kills
        wall = inv.mem_wall_bytes or _hard_harvest(inv.target, inv.user)
        if inv.oom or (  # the kernel killed a task in it, whatever ended the invocation
            outcome == "failure" and wall and inv.mem_peak_bytes >= wall
        ):  # it failed against its harvested limit: under the OOM hold a syscall's allocation
            outcome = "oom"  # there fails (EFAULT, ENOMEM) rather than wait, and nothing is killed
        failed = outcome != "success"
        stats, gs = self._function(inv.function)
        baseline = stats.baseline_duration_s
        mem_peak_mb = inv.mem_peak_bytes / MB
        user_mb = inv.user.mem_bytes / MB
        if learn or outcome == "oom":
            gs.observe(
                inv.guard,
                inv.alloc,
                inv.cpu_peak_cores,
                mem_peak_mb,
                failed,
                inv.input_size,
                inv.mem_start_bytes / MB,
                cpu_s,
                duration,
                self.act_cfg.cpu_period_us / 1e6,
                user_mb,
            )
            stats.on_completion(
                now,
                duration,
                inv.cpu_peak_cores,
                mem_peak_mb,
                at_user_size=inv.guard.sets_baseline(inv.alloc, inv.user_alloc, failed),
                input_size=inv.input_size,
            )
            if gs.calibrate is None and not stats.baseline_runs:  # e.g. a zero-length run:
                gs.calibrate = FIRST  # nothing has measured the user's size yet, the next run does
        # no baseline yet, a run cut short by shutdown/removal, or a decision never put in place:
        # nothing to credit the policy with
        known = (
            baseline == baseline
            and baseline > 0
            and outcome != "lost"
            and inv.trace.get("applied") is not False
        )
        reward = None
        core_s, mb_s = held_seconds(inv.trace, duration)
        if known:
            reward = invocation_reward(
                duration,
                baseline,
                failed=failed,
                cfg=self.reward_cfg,
                cpu_held=held_ratio(core_s, inv.user.cpu_cores, baseline),
                mem_held=held_ratio(mb_s, user_mb, baseline),
            )
        rfet = duration / baseline if known else None
        inv.trace.update(
            cpu_peak_cores=round(inv.cpu_peak_cores, 4),
            mem_peak_bytes=inv.mem_peak_bytes,
            throttled_share=_share(inv.throttle_start, usage),
            duration_s=round(duration, 6),
            held_core_s=round(core_s, 6),
            held_mb_s=round(mb_s, 6),
            rfet=None if rfet is None else round(rfet, 4),
            outcome=outcome,
            reward=reward,
        )
        return Ended(
            inv,
            outcome,
            duration,
            reward,
            rfet,
            self._record(inv, outcome, duration, reward, baseline).pack(),
            oom,
        )

    def _record(
        self, inv: Invocation, outcome: str, duration: float, reward: float | None, baseline: float
    ) -> Record:
        return Record(
            node=self.node_id,
            invocation=inv.id,
            function=inv.function,
            container=inv.container_id,
            time=inv.wall_start_s,
            grid=self.grid,
            model=inv.model,
            context=inv.ctx,
            cpu_block=inv.cpu_block,
            mem_block=inv.mem_block,
            mask=inv.guard.mask,
            action=inv.action,
            logp=inv.logp,
            user=inv.user_alloc,
            alloc=inv.alloc,
            reason=inv.guard.reason,
            reward=reward,
            baseline_s=baseline if baseline == baseline else None,
            duration_s=duration,
            outcome=outcome,
            cpu_peak_cores=inv.cpu_peak_cores,
            mem_peak_mb=inv.mem_peak_bytes / MB,
            give_backs=sorted(inv.given_back),
            inferred=inv.inferred,
        )

    # ------------------------------------------------------------------------ samples
    @staticmethod
    def _observe_usage(inv: Invocation, mem_bytes: int, mem_peak_bytes: int) -> None:
        inv.mem_peak_bytes = max(inv.mem_peak_bytes, mem_bytes, mem_peak_bytes)

    def on_samples(self, samples: Iterable[Any]) -> list[Effect]:
        effects: list[Effect] = []
        on_sample = self._on_sample
        for s in samples:
            on_sample(s, effects)
        return effects

    def on_sample(self, s: Any) -> list[Effect]:
        """One container's sample (``sidecar.sampler.Sample``) -> effects for the daemon to
        apply."""
        effects: list[Effect] = []
        self._on_sample(s, effects)
        return effects

    def _on_sample(self, s: Any, effects: list[Effect]) -> None:
        """on_sample appending to ``effects`` (once per container per tick: kept lean)."""
        c = self.containers.get(s.container_id)
        if c is None:
            return
        c.last_mem_bytes = s.mem_bytes
        inv = c.active
        rate = s.cpu_cores
        if s.oom_delta > 0:  # kills not reported yet (the end of the run they killed may have)
            seen = c.oom_kills
            kills = s.oom_delta if seen < 0 else min(s.oom_delta, s.oom_kills - seen)
            if kills > 0:
                c.oom_kills = s.oom_kills
                self._oom_tick(c, inv, s.oom_kills, kills, effects)
        if inv is not None:
            inv.samples += 1
            self._observe_usage(inv, s.mem_bytes, s.mem_peak_bytes)
            # only windows inside the invocation: one that began before it dilutes the peak
            if rate == rate and s.t_s - s.window_s >= inv.start_s - 0.1 * self.tick_s:
                inv.cpu_peak_cores = max(inv.cpu_peak_cores, rate)
            gb = self._give_back(inv, rate, s)
            if gb is not None:
                effects.append(gb)
        if self.bounds.infer and not c.hooked and rate == rate:
            effects.extend(self._infer(c, s, rate))

    def _oom_tick(
        self,
        c: ManagedContainer,
        inv: Invocation | None,
        count: int,
        kills: int,
        effects: list[Effect],
    ) -> None:
        """A tick read ``kills`` unreported kills (``count``: the cumulative count it read).

        Kills counted before the running invocation started are not its own, and no end reported
        them (one that saw them would have): they are charged as idle kills, the start having
        read the counter before any tick did."""
        killed = inv if inv is not None and count > inv.oom_kills_at_start else None
        if killed is not None:
            killed.oom = True
        else:
            _, gs = self._function(c.ref.function)
            gs.failures += 1
            gs.calibrate = FAILURE
        harvested = killed is not None and killed.mem_harvested
        effects.append(OomKill(c.ref.id, kills, killed.id if killed else None, harvested))

    def _give_back(self, inv: Invocation, rate: float, s: Any) -> GiveBack | None:
        """The give-back rules (see the module docstring) on one sample of ``inv``'s container."""
        t, user, cfg = inv.target, inv.user, self.sg_cfg
        if t.cpu_cores is None and t.mem_limit_bytes is None and t.mem_high_bytes is None:
            return None  # at the user's size: nothing was harvested, nothing to give back
        reasons: dict[str, str] = {}
        share = None
        if inv.cpu_harvested:
            share = self._throttled_share(inv, s)
            if share is not None and share > self.act_cfg.throttle_target:
                reasons["cpu"] = THROTTLED
            elif rate == rate and give_back_needed(rate, t.cpu_cores, user.cpu_cores, cfg):
                reasons["cpu"] = USAGE
        _, mem_alloc = effective(user, t)
        if "memory" not in inv.given_back and mem_alloc < user.mem_bytes:
            if s.mem_held:  # a task waits at the harvested limit (hold mode): wake it now
                reasons["memory"] = OOM_HOLD
            elif give_back_needed(s.mem_bytes, mem_alloc, user.mem_bytes, cfg):
                reasons["memory"] = USAGE
        if not reasons:
            return None
        if "cpu" in reasons:
            t = t._replace(cpu_cores=None, cpu_weight=None, cpu_period_us=None)
        if "memory" in reasons:
            inv.mem_wall_bytes = _hard_harvest(t, user)
            t = t._replace(mem_limit_bytes=None, mem_high_bytes=None)
        inv.given_back.update(reasons)
        inv.target = t
        cores, mem = effective(user, t)
        now = self.clock()
        for why in (OOM_HOLD, THROTTLED, USAGE):  # one trace entry per reason
            resources = [r for r, w in reasons.items() if w == why]
            if resources:
                inv.trace["give_backs"].append(
                    {
                        "resources": resources,
                        "reason": why,
                        "after_s": round(now - inv.start_s, 4),
                        "t_monotonic": now,
                        "tick": inv.samples,
                        "cpu_cores": None if rate != rate else round(rate, 4),
                        "mem_bytes": s.mem_bytes,
                        "throttled_share": None if share is None else round(share, 4),
                        "new_cpu_cores": cores,
                        "new_mem_bytes": mem,
                    }
                )
        return GiveBack(inv.container_id, inv.id, tuple(reasons), t, tuple(reasons.values()))

    @staticmethod
    def _throttled_share(inv: Invocation, s: Any) -> float | None:
        """Throttled share of the CFS periods since the last look (None: no period ended since,
        or the counters were not read); the sample's counters become the next look's start."""
        mark, now = inv.throttle_mark, (s.nr_periods, s.nr_throttled)
        periods = now[0] - mark[0] if mark is not None else -1
        if periods == 0:
            return None
        inv.throttle_mark = now
        return (now[1] - mark[1]) / periods if periods > 0 else None

    def _infer(self, c: ManagedContainer, s: Any, rate: float) -> list[Effect]:
        busy = rate >= self.bounds.busy_cores
        inv = c.active
        if inv is None:
            if busy:
                return [InferredStart(c.ref.id, s.t_s)]
            return []
        if not inv.inferred:
            return []
        if busy:
            c.quiet_ticks = 0
            c.last_busy_s = s.t_s
            return []
        c.quiet_ticks += 1
        if c.quiet_ticks >= self.bounds.idle_ticks:
            c.quiet_ticks = 0
            end = c.last_busy_s if c.last_busy_s == c.last_busy_s else s.t_s
            return [InferredEnd(inv.id, max(end, inv.start_s))]
        return []

    def note_inferred_start(self, container_id: str, t_s: float) -> None:
        c = self.containers.get(container_id)
        if c is not None:
            c.quiet_ticks = 0
            c.last_busy_s = t_s

    # ------------------------------------------------------------------------ views
    def allocations(
        self, function: str | None = None, container: str | None = None, limit: int = 100
    ) -> list[dict]:
        out = []
        for entry in reversed(self.trace):
            if function is not None and entry["function"] != function:
                continue
            if container is not None and entry["container"] != container:
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        return out


def _hard_harvest(target: Target, user: UserSize) -> int:
    """The target's hard memory limit when it is below the user's size, else 0."""
    m = target.mem_limit_bytes
    return m if m is not None and m < user.mem_bytes else 0


def _share(start: tuple[int, int] | None, end: Usage | None) -> float | None:
    """Throttled share of the CFS periods between a start's counters and an end's read."""
    if start is None or end is None or end.nr_periods <= start[0]:
        return None
    return round((end.nr_throttled - start[1]) / (end.nr_periods - start[0]), 4)


def allowed_units(guard: Guard) -> dict[str, list[int]]:
    """The safeguard's box (grid units, inclusive): what the policy could choose from, so that a
    trace tells a policy's choice from the safeguard's bounds."""
    return {"cpu_units": [guard.cpu_lo, guard.cpu_hi], "mem_units": [guard.mem_lo, guard.mem_hi]}


def trace_entry(inv: Invocation) -> dict:
    """The allocation-trace entry of a started invocation (``/debug/allocations``); its outcome
    fields stay None until it ends."""
    cores, mem = effective(inv.user, inv.target)
    return {
        "invocation": inv.id,
        "function": inv.function,
        "container": inv.container_id,
        "time": inv.wall_start_s,
        "user": {
            "cpu_cores": inv.user.cpu_cores,
            "mem_bytes": inv.user.mem_bytes,
            "units": list(inv.user_alloc),
        },
        "chosen": {"cpu_cores": cores, "mem_bytes": mem, "units": list(inv.alloc)},
        "allowed": allowed_units(inv.guard),
        "kind": _kind(inv.user, cores, mem),
        "reason": inv.guard.reason,
        "input_size": inv.input_size,
        "inferred": inv.inferred,
        "model": inv.model,
        "fallback": inv.fallback,
        "decision_us": round(inv.decision_s * 1e6, 1),
        "give_backs": [],
        "cpu_peak_cores": None,
        "mem_peak_bytes": None,
        "throttled_share": None,
        "duration_s": None,
        "held_core_s": None,
        "held_mb_s": None,
        "rfet": None,
        "outcome": None,
    }


def held_seconds(entry: dict, duration_s: float) -> tuple[float, float]:
    """(core-seconds, MB-seconds) an invocation held over ``duration_s``: the allocation in
    effect at each moment times how long it was, from its allocation-trace entry: the chosen size
    from the start, each give-back's new size from its ``after_s`` on (the user's, when the
    give-back's write failed and the container was restored). One definition for the reward,
    the trace and the end hook's answer."""
    cores, mem_mb = entry["chosen"]["cpu_cores"], entry["chosen"]["mem_bytes"] / MB
    core_s = mb_s = since = 0.0
    for gb in entry["give_backs"]:  # in the order they happened
        at = min(duration_s, max(since, gb["after_s"]))
        core_s += cores * (at - since)
        mb_s += mem_mb * (at - since)
        since, cores, mem_mb = at, gb["new_cpu_cores"], gb["new_mem_bytes"] / MB
    rest = max(0.0, duration_s - since)
    return core_s + cores * rest, mb_s + mem_mb * rest


def _kind(user: UserSize, cores: float, mem: int) -> str:
    """harvested (less of some resource, more of none), accelerated (more of some), or user."""
    more = cores > user.cpu_cores + 1e-9 or mem > user.mem_bytes
    less = cores < user.cpu_cores - 1e-9 or mem < user.mem_bytes
    if more:
        return "accelerated"
    return "harvested" if less else "user"
