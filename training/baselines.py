"""Resource managers behind one interface: Fixed, Greedy, ENSURE, VPA-style, Oracle, Learned, and
the daemon's model-free rules.

A manager sees each invocation's request (function, user size, the safeguard's verdict, the
function's statistics) and returns an allocation; ``observe`` tells it how a finished invocation
went. The simulator and the evaluation drive every manager the same way. Greedy, ENSURE and VPA
are ``BaselineRule``s: the one implementation of each, driven here by ``SimulatedRule`` and on
real functions by the local invoker (``training.invoker.invoker.Invoker``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable
from functools import partial
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from sidecar.core.decision import Decision
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.policy import Scorer, fallback_scorer
from training.sim.cluster import ClusterSim, Request


class Manager(Protocol):
    name: str

    def reset(self, sim: ClusterSim) -> None: ...

    def decide(self, sim: ClusterSim, req: Request) -> Alloc: ...

    def observe(self, sim: ClusterSim, inv: int) -> None: ...


class _Stateless:
    def reset(self, sim: ClusterSim) -> None:
        pass

    def observe(self, sim: ClusterSim, inv: int) -> None:
        pass


class Fixed(_Stateless):
    """The user's own size: RFET 1 by definition."""

    name = "fixed"

    def decide(self, sim: ClusterSim, req: Request) -> Alloc:
        return req.user


class Oracle(_Stateless):
    """Knows each invocation's true demand: the fewest resources at the fastest possible run.

    A bound, not a manager one can build: it ignores what its choices do to other invocations.
    """

    name = "oracle"

    def decide(self, sim: ClusterSim, req: Request) -> Alloc:
        return sim.oracle_alloc(req.inv)


class BoxedOracle(_Stateless):
    """The Oracle's allocation clipped, per resource, into the safeguard's allowed range: what a
    policy inside the safeguard's box could do at best for each invocation on its own (the
    fastest run the box allows, with the least it allows for it), so the room a learned policy
    has over the rules. Also the behaviour-cloning teacher (``training.pretrain``)."""

    name = "oracle_in_box"

    def decide(self, sim: ClusterSim, req: Request) -> Alloc:
        best = sim.oracle_alloc(req.inv)
        g = req.guard
        return Alloc(min(max(best.cpu, g.cpu_lo), g.cpu_hi), min(max(best.mem, g.mem_lo), g.mem_hi))


class Run(NamedTuple):
    """A finished invocation as the baseline rules see it, in cores and MB.

    The simulator adapts its log to it (``SimulatedRule``), the real invoker its measurements
    (``training.invoker.invoker.Invoker``). The allocation it ran with need not lie on the grid:
    on the real invoker a user's size may be off it (0.5 core on a 1-core grid).
    """

    cpu_cores: float
    mem_mb: float
    cpu_peak_cores: float
    mem_peak_mb: float
    exec_s: float
    baseline_s: float
    """The function's execution time at the user's size (ENSURE's reference); NaN: not known."""
    failed: bool
    oom: bool
    """The kernel killed it for memory (a failure too)."""


Target = tuple[int | None, int | None]
"""A rule's allocation in grid units (CPU, memory); None keeps the user's size of that resource."""
USER: Target = (None, None)


_EPS = 1e-9
"""How near a grid point a size counts as on it (as in ``ResourceGrid``'s ceilings)."""


def _up(x: float, unit: float, n: int) -> int:
    """Units of the grid point strictly above ``x`` (x need not lie on the grid), in [1, n]."""
    return min(n, max(1, math.floor(x / unit + _EPS) + 1))


def _down(x: float, unit: float, n: int) -> int:
    """Units of the grid point strictly below ``x``, in [1, n]."""
    return min(n, max(1, math.ceil(x / unit - _EPS) - 1))


class BaselineRule(Protocol):
    """Greedy, ENSURE and VPA: per-function rules from a function's finished runs."""

    name: str
    grid: ResourceGrid

    def decide(self, fn: Hashable) -> Target: ...

    def observe(self, fn: Hashable, run: Run) -> None: ...


class Greedy:
    """One unit up when the last run used >= 90% of a resource, one unit down otherwise.

    The reference's Greedy baseline: it follows the last invocation only, so it harvests below
    the working set (an OOM kill, then back to the user's size) and slows CPU-bound functions.
    """

    name = "greedy"
    threshold = 0.9

    def __init__(self, grid: ResourceGrid) -> None:
        self.grid = grid
        self.alloc: dict[Hashable, Alloc] = {}

    def decide(self, fn: Hashable) -> Target:
        return self.alloc.get(fn, USER)

    def observe(self, fn: Hashable, run: Run) -> None:
        if run.failed:
            self.alloc.pop(fn, None)
            return
        g = self.grid
        cpu_step = _up if run.cpu_peak_cores >= self.threshold * run.cpu_cores else _down
        mem_step = _up if run.mem_peak_mb >= self.threshold * run.mem_mb else _down
        self.alloc[fn] = Alloc(
            cpu_step(run.cpu_cores, g.cpu_unit_cores, g.cpu_units),
            mem_step(run.mem_mb, g.mem_unit_mb, g.mem_units),
        )


class Ensure:
    """ENSURE (Suresh et al., ACSOS 2020): CPU only; adds a core when it detects a slowdown.

    A run slower than ``1 + slack`` times the function's baseline (its time at the user's size:
    ``Run.baseline_s``) adds one CPU unit; ``calm_runs`` runs in a row within the baseline with
    idle CPU reclaim one. Memory stays at the user's size; failed runs and runs without a
    baseline change nothing. (The reference code never added CPU; that bug is fixed.)
    """

    name = "ensure"
    slack = 0.1
    calm_runs = 3
    idle_util = 0.7

    def __init__(self, grid: ResourceGrid) -> None:
        self.grid = grid
        self.cpu: dict[Hashable, int] = {}
        self.calm: dict[Hashable, int] = {}

    def decide(self, fn: Hashable) -> Target:
        return self.cpu.get(fn), None

    def observe(self, fn: Hashable, run: Run) -> None:
        base = run.baseline_s
        if run.failed or not base == base:  # NaN: no user-size run measured yet
            return
        g = self.grid
        c = run.cpu_cores
        if run.exec_s > (1 + self.slack) * base:
            self.cpu[fn] = _up(c, g.cpu_unit_cores, g.cpu_units)
            self.calm[fn] = 0
        elif run.cpu_peak_cores < self.idle_util * c:
            self.calm[fn] = self.calm.get(fn, 0) + 1
            if self.calm[fn] >= self.calm_runs:
                self.cpu[fn] = _down(c, g.cpu_unit_cores, g.cpu_units)
                self.calm[fn] = 0


class Vpa:
    """Kubernetes VPA-style: a percentile of recent usage plus a safety margin, per resource.

    CPU target = 90th percentile of recent peaks, memory = the recent maximum, both x 1.15 and
    rounded up to grid units; an OOM kill records 1.2x the limit as usage (as VPA does). The
    user's size until ``min_samples`` runs.
    """

    name = "vpa"
    window = 20
    min_samples = 3
    margin = 1.15
    oom_bump = 1.2

    def __init__(self, grid: ResourceGrid) -> None:
        self.grid = grid
        self.cpu: dict[Hashable, deque[float]] = {}
        self.mem: dict[Hashable, deque[float]] = {}

    def decide(self, fn: Hashable) -> Target:
        cpu = self.cpu.get(fn)
        if cpu is None or len(cpu) < self.min_samples:
            return USER
        g = self.grid
        c = g.cpu_units_ceil(float(np.percentile(cpu, 90)) * self.margin)
        m = g.mem_units_ceil(max(self.mem[fn]) * self.margin)
        return min(g.cpu_units, max(1, c)), min(g.mem_units, max(1, m))

    def observe(self, fn: Hashable, run: Run) -> None:
        mem_peak = self.oom_bump * run.mem_mb if run.oom else run.mem_peak_mb
        self.cpu.setdefault(fn, deque(maxlen=self.window)).append(run.cpu_peak_cores)
        self.mem.setdefault(fn, deque(maxlen=self.window)).append(mem_peak)


BASELINE_RULES: dict[str, type[BaselineRule]] = {r.name: r for r in (Greedy, Ensure, Vpa)}


class SimulatedRule:
    """A baseline rule as a simulator manager: ``ClusterSim``'s log adapted to ``Run``.

    The simulator's only failure is an OOM kill; ENSURE's baseline is the function's
    ``FunctionStats.baseline_duration_s`` when the invocation arrived: a baseline known before
    the run, as on the real invoker, not one that already averages the run in.
    """

    def __init__(self, rule: type[BaselineRule]) -> None:
        self.rule_type = rule
        self.name = rule.name

    def reset(self, sim: ClusterSim) -> None:
        self.rule = self.rule_type(sim.grid)
        self.baseline: dict[int, float] = {}
        """Invocation -> its function's baseline at its arrival, until it is observed."""

    def decide(self, sim: ClusterSim, req: Request) -> Alloc:
        self.baseline[req.inv] = req.stats.baseline_duration_s
        cpu, mem = self.rule.decide(req.fn)
        user = req.user
        return Alloc(user.cpu if cpu is None else cpu, user.mem if mem is None else mem)

    def observe(self, sim: ClusterSim, inv: int) -> None:
        log, g = sim.log, sim.grid
        fn = log.fn[inv]
        failed = log.failed[inv]
        run = Run(
            g.cores(log.cpu[inv]),
            g.mb(log.mem[inv]),
            log.cpu_peak[inv],
            log.mem_peak[inv],
            log.exec_s[inv],
            self.baseline.pop(inv),
            failed,
            failed,
        )
        self.rule.observe(fn, run)


RULE_MANAGERS = {"rule": "user", "smallest": "smallest"}
"""Simulator manager -> the daemon's rule it runs: ``rule`` is the daemon without a model (the
allowed candidate closest to the user's size), ``smallest`` the fewest resources allowed."""


class Choices:
    """Per invocation: how many candidates the safeguard allowed, and whether the policy's choice
    differs from what each model-free rule would have chosen in the same state (the question
    whether learning learned anything a rule does not do)."""

    def __init__(self, n: int) -> None:
        self.options = np.zeros(n, dtype=np.int64)
        self.differs = {name: np.zeros(n, dtype=bool) for name in RULE_MANAGERS}
        self._rules = {name: fallback_scorer(rule) for name, rule in RULE_MANAGERS.items()}

    def record(self, inv: int, d: Decision) -> None:
        mask = d.obs.mask
        self.options[inv] = int(mask.sum())
        if self.options[inv] > 1:
            rows = d.obs.rows()
            for name, scorer in self._rules.items():
                s = np.where(mask, scorer.scores(rows), -np.inf)
                self.differs[name][inv] = int(np.argmax(s)) != d.action


class Learned(_Stateless):
    """The score-function policy under the safeguard, through the host's decision path
    (``sidecar.core.decision``): features -> scorer -> masked argmax, or a sample with ``rng``.
    ``choices`` (after ``reset`` with ``track_choices``) compares each choice with the rules'."""

    name = "learned"

    def __init__(
        self,
        scorer: Scorer,
        rng: np.random.Generator | None = None,
        track_choices: bool = False,
    ) -> None:
        self.scorer = scorer
        self.rng = rng
        self.track_choices = track_choices
        self.choices: Choices | None = None

    def reset(self, sim: ClusterSim) -> None:
        self.choices = Choices(sim.wl.n_invocations) if self.track_choices else None

    @classmethod
    def from_onnx(cls, path: str | Path, grid: ResourceGrid) -> Learned:
        """The model at ``path`` after the checks a host runs before loading one
        (``sidecar.models.validate``: its feature schema and grid must be this code's and
        ``grid``); raises ``sidecar.models.ModelRejected`` with the reason otherwise."""
        from sidecar.models import validate

        scorer, _ = validate(Path(path).read_bytes(), grid, None)
        return cls(scorer)

    def decision(self, sim: ClusterSim, req: Request) -> Decision:
        """The whole decision (observation, action, log-probability) for ``req``."""
        return sim.decider.decide(
            self.scorer,
            sim.node_state(),
            req.stats,
            req.guard_state,
            req.user,
            req.now_s,
            guard=req.guard,
            input_size=req.input_size,
            rng=self.rng,
        )

    def decide(self, sim: ClusterSim, req: Request) -> Alloc:
        d = self.decision(sim, req)
        if self.choices is not None:
            self.choices.record(req.inv, d)
        return sim.grid.alloc(d.action)


class Rule(Learned):
    """A model-free rule of the daemon (``[model] rule``) through the same decision path."""

    def __init__(self, name: str, rule: str) -> None:
        super().__init__(fallback_scorer(rule))
        self.name = name


BASELINES: dict[str, Callable[[], Manager]] = {
    "fixed": Fixed,
    **{name: partial(SimulatedRule, rule) for name, rule in BASELINE_RULES.items()},
    "oracle": Oracle,
    "oracle_in_box": BoxedOracle,
}
