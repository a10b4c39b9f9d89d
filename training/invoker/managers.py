"""Greedy, ENSURE and VPA as managers the local invoker applies itself (no sidecar).

Pure rules, no cgroups: before each invocation the invoker asks ``decide(function, user)`` for an
allocation, applies it to the container's cgroup, runs the invocation, measures it (CPU = the
cgroup's ``cpuacct.usage`` delta over the run / wall time, memory = ``memory.max_usage_in_bytes``
reset before the run, execution time, outcome), tells the manager with ``observe`` and restores
the user's size. The rules mirror ``training/baselines.py`` (the simulator's versions) on the
learned run's grid (``faasrm bench real``: the model's; by default 0.25-core CPU units and 64 MB
memory units, 8 of each).

Users' sizes need not lie on the grid (pyloop's user has 0.5 core): "one unit up" from a size is
the next grid point strictly above it, "one unit down" the next strictly below, both clamped to
[1 unit, grid max] (so on a 1-core grid "down" from 0.5 core is 1 core).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sidecar.core.grid import ResourceGrid


@dataclass(frozen=True)
class Alloc:
    cpu_cores: float
    mem_mb: float


@dataclass(frozen=True)
class Grid(ResourceGrid):
    """The run's ``ResourceGrid`` with the up/down steps of these rules (sizes off the grid)."""

    @staticmethod
    def _clamp(units: int, n: int) -> int:
        return min(n, max(1, units))

    def cpu_up(self, cores: float) -> float:
        u = math.floor(cores / self.cpu_unit_cores + 1e-9) + 1
        return self._clamp(u, self.cpu_units) * self.cpu_unit_cores

    def cpu_down(self, cores: float) -> float:
        u = math.ceil(cores / self.cpu_unit_cores - 1e-9) - 1
        return self._clamp(u, self.cpu_units) * self.cpu_unit_cores

    def cpu_ceil(self, cores: float) -> float:
        u = math.ceil(cores / self.cpu_unit_cores - 1e-9)
        return self._clamp(u, self.cpu_units) * self.cpu_unit_cores

    def mem_up(self, mb: float) -> float:
        u = math.floor(mb / self.mem_unit_mb + 1e-9) + 1
        return self._clamp(u, self.mem_units) * self.mem_unit_mb

    def mem_down(self, mb: float) -> float:
        u = math.ceil(mb / self.mem_unit_mb - 1e-9) - 1
        return self._clamp(u, self.mem_units) * self.mem_unit_mb

    def mem_ceil(self, mb: float) -> float:
        u = math.ceil(mb / self.mem_unit_mb - 1e-9)
        return self._clamp(u, self.mem_units) * self.mem_unit_mb


@dataclass(frozen=True)
class Observation:
    """One finished invocation as the invoker measured it."""

    given: Alloc  # what the container actually had (after a refused memory write: the user's)
    cpu_peak_cores: float  # CPU seconds used / wall seconds of the run
    mem_peak_mb: float  # memory.max_usage_in_bytes over the run
    exec_s: float
    outcome: str = "success"  # success / failure / oom

    @property
    def failed(self) -> bool:
        return self.outcome != "success"


class RealManager(Protocol):
    name: str

    def decide(self, fn: str, user: Alloc) -> Alloc: ...

    def observe(self, fn: str, user: Alloc, obs: Observation) -> None: ...


class Greedy:
    """One unit up when the last run used >= 90% of a resource, one unit down otherwise; the
    user's size again after an OOM kill (or any failed run, as the simulator's Greedy)."""

    name = "greedy"
    threshold = 0.9

    def __init__(self, grid: Grid | None = None) -> None:
        self.grid = grid or Grid()
        self.alloc: dict[str, Alloc] = {}

    def decide(self, fn: str, user: Alloc) -> Alloc:
        return self.alloc.get(fn, user)

    def observe(self, fn: str, user: Alloc, obs: Observation) -> None:
        if obs.failed:
            self.alloc[fn] = user
            return
        g, given = self.grid, obs.given
        cpu = (g.cpu_up if obs.cpu_peak_cores >= self.threshold * given.cpu_cores else g.cpu_down)(
            given.cpu_cores
        )
        mem = (g.mem_up if obs.mem_peak_mb >= self.threshold * given.mem_mb else g.mem_down)(
            given.mem_mb
        )
        self.alloc[fn] = Alloc(cpu, mem)


class Ensure:
    """ENSURE: CPU only. A run slower than 1.1x the function's mean time at the user's size adds
    a unit; 3 calm runs in a row (CPU use < 70% of the allocation) take one away. Memory stays
    at the user's size. The baseline is ``baselines[fn]`` when given (the Fixed run's mean),
    else the mean of this manager's own runs at the user's size; no change without one."""

    name = "ensure"
    slack = 0.1
    calm_runs = 3
    idle_util = 0.7

    def __init__(self, grid: Grid | None = None, baselines: dict[str, float] | None = None) -> None:
        self.grid = grid or Grid()
        self.baselines = dict(baselines or {})
        self.cpu: dict[str, float] = {}
        self.calm: dict[str, int] = {}
        self._user_runs: dict[str, list[float]] = {}

    def baseline(self, fn: str) -> float | None:
        if fn in self.baselines:
            return self.baselines[fn]
        runs = self._user_runs.get(fn)
        return float(np.mean(runs)) if runs else None

    def decide(self, fn: str, user: Alloc) -> Alloc:
        return Alloc(self.cpu.get(fn, user.cpu_cores), user.mem_mb)

    def observe(self, fn: str, user: Alloc, obs: Observation) -> None:
        if obs.failed:
            return
        c = obs.given.cpu_cores
        if abs(c - user.cpu_cores) < 1e-9:
            self._user_runs.setdefault(fn, []).append(obs.exec_s)
        base = self.baseline(fn)
        if base is None:
            return
        if obs.exec_s > (1 + self.slack) * base:
            self.cpu[fn] = self.grid.cpu_up(c)
            self.calm[fn] = 0
        elif obs.cpu_peak_cores < self.idle_util * c:
            self.calm[fn] = self.calm.get(fn, 0) + 1
            if self.calm[fn] >= self.calm_runs:
                self.cpu[fn] = self.grid.cpu_down(c)
                self.calm[fn] = 0


class Vpa:
    """VPA-style: after 3 runs, CPU = p90 of recent CPU peaks x 1.15 and memory = max of recent
    memory peaks x 1.15 (an OOM kill records 1.2x the limit), rounded up to grid units."""

    name = "vpa"
    window = 20
    min_samples = 3
    margin = 1.15
    oom_bump = 1.2

    def __init__(self, grid: Grid | None = None) -> None:
        self.grid = grid or Grid()
        self.cpu: dict[str, deque[float]] = {}
        self.mem: dict[str, deque[float]] = {}

    def decide(self, fn: str, user: Alloc) -> Alloc:
        cpu = self.cpu.get(fn)
        if cpu is None or len(cpu) < self.min_samples:
            return user
        g = self.grid
        return Alloc(
            g.cpu_ceil(float(np.percentile(list(cpu), 90)) * self.margin),
            g.mem_ceil(max(self.mem[fn]) * self.margin),
        )

    def observe(self, fn: str, user: Alloc, obs: Observation) -> None:
        mem = obs.mem_peak_mb
        if obs.outcome == "oom":
            mem = self.oom_bump * obs.given.mem_mb
        self.cpu.setdefault(fn, deque(maxlen=self.window)).append(obs.cpu_peak_cores)
        self.mem.setdefault(fn, deque(maxlen=self.window)).append(mem)


LOCAL_MANAGERS: dict[str, type] = {m.name: m for m in (Greedy, Ensure, Vpa)}


def make(
    name: str, grid: Grid | None = None, baselines: dict[str, float] | None = None
) -> RealManager:
    if name == "ensure":
        return Ensure(grid, baselines)
    return LOCAL_MANAGERS[name](grid)


def kind(user: Alloc, a: Alloc) -> str:
    """harvested (less of some resource, more of none), accelerated (more of some), or user:
    the sidecar's classification (``sidecar.engine._kind``)."""
    more = a.cpu_cores > user.cpu_cores + 1e-9 or a.mem_mb > user.mem_mb + 1e-9
    less = a.cpu_cores < user.cpu_cores - 1e-9 or a.mem_mb < user.mem_mb - 1e-9
    if more:
        return "accelerated"
    return "harvested" if less else "user"
