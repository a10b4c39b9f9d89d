"""Resource managers behind one interface: Fixed, Greedy, ENSURE, VPA-style, Oracle, Learned, and
the daemon's model-free rules.

A manager sees each invocation's request (function, user size, the safeguard's verdict, the
function's statistics) and returns an allocation; ``observe`` tells it how a finished invocation
went. The simulator and the evaluation drive every manager the same way.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Protocol

import numpy as np

from sidecar.core.decision import Decision
from sidecar.core.grid import Alloc
from sidecar.core.policy import OnnxScorer, Scorer, fallback_scorer
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


def _peaks(sim: ClusterSim, inv: int) -> tuple[float, float, float, float]:
    """(cpu peak, mem peak, cpu given, mem given) of a finished invocation, in cores and MB."""
    res = sim.log
    g = sim.grid
    return res.cpu_peak[inv], res.mem_peak[inv], g.cores(res.cpu[inv]), g.mb(res.mem[inv])


class Greedy:
    """One unit up when the last run used >= 90% of a resource, one unit down otherwise.

    The reference's Greedy baseline: it follows the last invocation only, so it harvests below
    the working set (an OOM kill, then back to the user's size) and slows CPU-bound functions.
    """

    name = "greedy"
    threshold = 0.9

    def reset(self, sim: ClusterSim) -> None:
        self.alloc: dict[int, Alloc] = {}

    def decide(self, sim: ClusterSim, req: Request) -> Alloc:
        return self.alloc.get(req.fn, req.user)

    def observe(self, sim: ClusterSim, inv: int) -> None:
        g = sim.grid
        fn = sim.log.fn[inv]
        if sim.log.failed[inv]:
            self.alloc[fn] = sim.user_alloc(fn)
            return
        cpu_peak, mem_peak, cpu, mem = _peaks(sim, inv)
        c, m = sim.log.cpu[inv], sim.log.mem[inv]
        c = c + 1 if cpu_peak >= self.threshold * cpu else c - 1
        m = m + 1 if mem_peak >= self.threshold * mem else m - 1
        self.alloc[fn] = Alloc(min(g.cpu_units, max(1, c)), min(g.mem_units, max(1, m)))


class Ensure:
    """ENSURE (Suresh et al., ACSOS 2020): CPU only; adds a core when it detects a slowdown.

    A run slower than ``1 + slack`` times the function's baseline (its mean at the user's size)
    adds one CPU unit; ``calm_runs`` runs in a row within the baseline with idle CPU reclaim one.
    Memory stays at the user's size. (The reference code never added CPU; that bug is fixed.)
    """

    name = "ensure"
    slack = 0.1
    calm_runs = 3
    idle_util = 0.7

    def reset(self, sim: ClusterSim) -> None:
        self.cpu: dict[int, int] = {}
        self.calm: dict[int, int] = {}

    def decide(self, sim: ClusterSim, req: Request) -> Alloc:
        return Alloc(self.cpu.get(req.fn, req.user.cpu), req.user.mem)

    def observe(self, sim: ClusterSim, inv: int) -> None:
        g = sim.grid
        res = sim.log
        fn = res.fn[inv]
        base = sim.stats[fn].baseline_duration_s
        c = res.cpu[inv]
        if not base == base:  # no user-size run measured yet
            return
        cpu_peak, _, cpu, _ = _peaks(sim, inv)
        if res.exec_s[inv] > (1 + self.slack) * base:
            self.cpu[fn] = min(g.cpu_units, c + 1)
            self.calm[fn] = 0
        elif cpu_peak < self.idle_util * cpu:
            self.calm[fn] = self.calm.get(fn, 0) + 1
            if self.calm[fn] >= self.calm_runs:
                self.cpu[fn] = max(1, c - 1)
                self.calm[fn] = 0


class Vpa:
    """Kubernetes VPA-style: a percentile of recent usage plus a safety margin, per resource.

    CPU target = 90th percentile of recent peaks, memory = the recent maximum, both x 1.15; an
    OOM kill records 1.2x the limit as usage (as VPA does). User size until ``min_samples`` runs.
    """

    name = "vpa"
    window = 20
    min_samples = 3
    margin = 1.15

    def reset(self, sim: ClusterSim) -> None:
        self.cpu: dict[int, deque[float]] = {}
        self.mem: dict[int, deque[float]] = {}

    def decide(self, sim: ClusterSim, req: Request) -> Alloc:
        cpu = self.cpu.get(req.fn)
        if cpu is None or len(cpu) < self.min_samples:
            return req.user
        g = sim.grid
        c = g.cpu_units_ceil(float(np.percentile(cpu, 90)) * self.margin)
        m = g.mem_units_ceil(max(self.mem[req.fn]) * self.margin)
        return Alloc(min(g.cpu_units, max(1, c)), min(g.mem_units, max(1, m)))

    def observe(self, sim: ClusterSim, inv: int) -> None:
        fn = sim.log.fn[inv]
        cpu_peak, mem_peak, _, mem = _peaks(sim, inv)
        if sim.log.failed[inv]:
            mem_peak = 1.2 * mem
        self.cpu.setdefault(fn, deque(maxlen=self.window)).append(cpu_peak)
        self.mem.setdefault(fn, deque(maxlen=self.window)).append(mem_peak)


class Learned(_Stateless):
    """The score-function policy under the safeguard, through the host's decision path
    (``sidecar.core.decision``): features -> scorer -> masked argmax, or a sample with ``rng``."""

    name = "learned"

    def __init__(self, scorer: Scorer, rng: np.random.Generator | None = None) -> None:
        self.scorer = scorer
        self.rng = rng

    @classmethod
    def from_onnx(cls, path: str | Path) -> Learned:
        return cls(OnnxScorer(path))

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
            rng=self.rng,
        )

    def decide(self, sim: ClusterSim, req: Request) -> Alloc:
        return sim.grid.alloc(self.decision(sim, req).action)


class Rule(Learned):
    """A model-free rule of the daemon (``[model] rule``) through the same decision path."""

    def __init__(self, name: str, rule: str) -> None:
        super().__init__(fallback_scorer(rule))
        self.name = name


RULE_MANAGERS = {"rule": "user", "smallest": "smallest"}
"""Simulator manager -> the daemon's rule it runs: ``rule`` is the daemon without a model (the
allowed candidate closest to the user's size), ``smallest`` the fewest resources allowed."""


BASELINES: dict[str, type] = {m.name: m for m in (Fixed, Greedy, Ensure, Vpa, Oracle)}
