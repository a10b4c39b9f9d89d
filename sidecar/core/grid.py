"""Resource units and the candidate grid: the action space.

An action is one (cpu, memory) candidate. Candidates are indexed cpu-major:
``index = (cpu_units - 1) * mem_units + (mem_units_chosen - 1)``. CPU and memory are decoupled, as
in the reference design; the unit sizes are configurable so a 2-core host can use 0.25-core units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np

_EPS = 1e-9
_MAX_SIZES = 4096
"""User sizes ``ResourceGrid.nearest`` remembers (it starts over beyond them)."""


class Alloc(NamedTuple):
    """An allocation in grid units (both 1-based)."""

    cpu: int
    mem: int


@dataclass(frozen=True)
class ResourceGrid:
    """CPU 1..cpu_units units of cpu_unit_cores, memory 1..mem_units units of mem_unit_mb."""

    cpu_unit_cores: float = 1.0
    cpu_units: int = 8
    mem_unit_mb: float = 64.0
    mem_units: int = 8

    def __post_init__(self) -> None:
        if not (self.cpu_unit_cores > 0 and self.mem_unit_mb > 0):  # also refuses NaN
            raise ValueError("unit sizes must be positive")
        if self.cpu_units < 1 or self.mem_units < 1:
            raise ValueError("the grid needs at least one unit of each resource")

    @property
    def n(self) -> int:
        """Number of candidates (the action-space size)."""
        return self.cpu_units * self.mem_units

    @property
    def max_cores(self) -> float:
        return self.cpu_units * self.cpu_unit_cores

    @property
    def max_mb(self) -> float:
        return self.mem_units * self.mem_unit_mb

    def index(self, alloc: Alloc) -> int:
        return (alloc.cpu - 1) * self.mem_units + (alloc.mem - 1)

    def alloc(self, index: int) -> Alloc:
        cpu, mem = divmod(int(index), self.mem_units)
        return Alloc(cpu + 1, mem + 1)

    @cached_property
    def cand_cpu(self) -> np.ndarray:
        """CPU units of every candidate, shape (n,)."""
        return np.repeat(np.arange(1, self.cpu_units + 1), self.mem_units)

    @cached_property
    def cand_mem(self) -> np.ndarray:
        """Memory units of every candidate, shape (n,)."""
        return np.tile(np.arange(1, self.mem_units + 1), self.cpu_units)

    def range_mask(self, cpu_lo: int, cpu_hi: int, mem_lo: int, mem_hi: int) -> np.ndarray:
        """Read-only boolean mask of the candidates inside the two ranges (cached: few distinct)."""
        key = (cpu_lo, cpu_hi, mem_lo, mem_hi)
        mask = self._masks.get(key)
        if mask is None:
            cpu_ok = (self.cand_cpu >= cpu_lo) & (self.cand_cpu <= cpu_hi)
            mem_ok = (self.cand_mem >= mem_lo) & (self.cand_mem <= mem_hi)
            mask = cpu_ok & mem_ok
            mask.setflags(write=False)
            self._masks[key] = mask
        return mask

    @cached_property
    def _masks(self) -> dict[tuple[int, int, int, int], np.ndarray]:
        return {}

    @cached_property
    def allocs(self) -> tuple[Alloc, ...]:
        """Every candidate's allocation, by index (``allocs[i] == alloc(i)``)."""
        return tuple(self.alloc(i) for i in range(self.n))

    def cores(self, units: int) -> float:
        return units * self.cpu_unit_cores

    def mb(self, units: int) -> float:
        return units * self.mem_unit_mb

    def cpu_units_ceil(self, cores: float) -> int:
        """Smallest number of CPU units holding ``cores`` (may exceed the grid; callers clamp)."""
        return max(0, math.ceil(cores / self.cpu_unit_cores - _EPS))

    def mem_units_ceil(self, mb: float) -> int:
        """Smallest number of memory units holding ``mb`` (may exceed the grid; callers clamp)."""
        return max(0, math.ceil(mb / self.mem_unit_mb - _EPS))

    def nearest(self, cores: float, mb: float) -> Alloc:
        """The grid point nearest to a user's setting, clamped to the grid.

        A user's size need not be a multiple of the unit; the policy works on the grid, while
        restoring a container always writes the user's exact original limits. Remembered per
        size: a host asks for the same few sizes on every invocation.
        """
        key = (cores, mb)
        alloc = self._nearest.get(key)
        if alloc is None:
            # Halves round up (Python's round() would send 2.5 units to 2 but 3.5 to 4).
            cpu = min(self.cpu_units, max(1, math.floor(cores / self.cpu_unit_cores + 0.5)))
            mem = min(self.mem_units, max(1, math.floor(mb / self.mem_unit_mb + 0.5)))
            alloc = Alloc(cpu, mem)
            if len(self._nearest) >= _MAX_SIZES:
                self._nearest.clear()
            self._nearest[key] = alloc
        return alloc

    @cached_property
    def _nearest(self) -> dict[tuple[float, float], Alloc]:
        return {}
