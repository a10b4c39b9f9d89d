"""The candidate grid: indexing, unit conversions and validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core.grid import Alloc, ResourceGrid

CPU_UNITS = (0.1, 0.25, 0.5, 1.0, 2.0)
MEM_UNITS = (8.0, 16.0, 32.0, 64.0, 128.0, 100.0)


@st.composite
def grids(draw) -> ResourceGrid:
    return ResourceGrid(
        cpu_unit_cores=draw(st.sampled_from(CPU_UNITS)),
        cpu_units=draw(st.integers(1, 16)),
        mem_unit_mb=draw(st.sampled_from(MEM_UNITS)),
        mem_units=draw(st.integers(1, 16)),
    )


@given(grids())
def test_index_alloc_round_trip_for_every_candidate(g: ResourceGrid) -> None:
    seen = set()
    for i in range(g.n):
        a = g.alloc(i)
        assert 1 <= a.cpu <= g.cpu_units and 1 <= a.mem <= g.mem_units
        assert g.index(a) == i
        seen.add(a)
    assert len(seen) == g.n
    for cpu in range(1, g.cpu_units + 1):
        for mem in range(1, g.mem_units + 1):
            assert g.alloc(g.index(Alloc(cpu, mem))) == Alloc(cpu, mem)


@given(grids())
def test_candidate_arrays_are_consistent_with_index(g: ResourceGrid) -> None:
    assert g.cand_cpu.shape == (g.n,) and g.cand_mem.shape == (g.n,)
    for i in range(g.n):
        a = g.alloc(i)
        assert (g.cand_cpu[i], g.cand_mem[i]) == (a.cpu, a.mem)
    # cpu-major: memory varies fastest
    assert g.index(Alloc(1, 2 if g.mem_units > 1 else 1)) == (1 if g.mem_units > 1 else 0)


def test_index_layout_is_cpu_major() -> None:
    g = ResourceGrid(cpu_unit_cores=1.0, cpu_units=3, mem_unit_mb=64.0, mem_units=4)
    assert g.n == 12
    assert g.index(Alloc(1, 1)) == 0
    assert g.index(Alloc(1, 4)) == 3
    assert g.index(Alloc(2, 1)) == 4
    assert g.index(Alloc(3, 4)) == 11
    assert g.alloc(np.int64(5)) == Alloc(2, 2)
    np.testing.assert_array_equal(g.cand_cpu, [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(g.cand_mem, [1, 2, 3, 4] * 3)


def test_fractional_cpu_unit_grid() -> None:
    g = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=4)
    assert g.max_cores == pytest.approx(2.0)
    assert g.max_mb == pytest.approx(256.0)
    assert g.cores(3) == pytest.approx(0.75)
    assert g.cpu_units_ceil(0.75) == 3
    assert g.cpu_units_ceil(0.76) == 4
    assert g.cpu_units_ceil(0.5) == 2
    assert g.cpu_units_ceil(0.2) == 1
    assert g.nearest(1.0, 128.0) == Alloc(4, 2)
    assert g.nearest(0.8, 100.0) == Alloc(3, 2)  # 3.2 units -> 3; 1.5625 units -> 2
    assert g.index(g.nearest(2.0, 256.0)) == g.n - 1


@pytest.mark.parametrize("unit", [0.1, 0.2, 0.25, 0.3, 0.5, 1.0, 1.5])
def test_cpu_units_ceil_exact_at_boundaries(unit: float) -> None:
    g = ResourceGrid(cpu_unit_cores=unit, cpu_units=64)
    assert g.cpu_units_ceil(0.0) == 0
    for k in range(0, 41):
        # exactly k units (computed as a float product, e.g. 3 * 0.1 = 0.30000000000000004)
        assert g.cpu_units_ceil(k * unit) == k
        # a little more than k units needs k + 1
        assert g.cpu_units_ceil(k * unit + unit * 1e-3) == k + 1
        if k > 0:
            assert g.cpu_units_ceil(k * unit - unit * 1e-3) == k


@pytest.mark.parametrize("unit", [8.0, 16.0, 64.0, 100.0, 12.5, 0.1])
def test_mem_units_ceil_exact_at_boundaries(unit: float) -> None:
    g = ResourceGrid(mem_unit_mb=unit, mem_units=64)
    assert g.mem_units_ceil(0.0) == 0
    assert g.mem_units_ceil(-5.0) == 0  # never negative
    for k in range(0, 41):
        assert g.mem_units_ceil(k * unit) == k
        assert g.mem_units_ceil(k * unit + unit * 1e-3) == k + 1
        if k > 0:
            assert g.mem_units_ceil(k * unit - unit * 1e-3) == k


def test_units_ceil_may_exceed_the_grid() -> None:
    g = ResourceGrid(cpu_unit_cores=1.0, cpu_units=4, mem_unit_mb=64.0, mem_units=4)
    assert g.cpu_units_ceil(10.0) == 10
    assert g.mem_units_ceil(1000.0) == 16


@given(grids(), st.floats(0, 1e4), st.floats(0, 1e6))
def test_units_ceil_is_the_smallest_holding_count(g: ResourceGrid, cores: float, mb: float) -> None:
    c = g.cpu_units_ceil(cores)
    m = g.mem_units_ceil(mb)
    tol = 1e-6
    assert c * g.cpu_unit_cores >= cores - tol * max(1.0, cores)
    assert c == 0 or (c - 1) * g.cpu_unit_cores < cores + tol * max(1.0, cores)
    assert m * g.mem_unit_mb >= mb - tol * max(1.0, mb)
    assert m == 0 or (m - 1) * g.mem_unit_mb < mb + tol * max(1.0, mb)


def test_nearest_clamps_to_the_grid() -> None:
    g = ResourceGrid(cpu_unit_cores=0.5, cpu_units=4, mem_unit_mb=64.0, mem_units=8)
    assert g.nearest(0.0, 0.0) == Alloc(1, 1)
    assert g.nearest(0.01, 1.0) == Alloc(1, 1)
    assert g.nearest(-3.0, -100.0) == Alloc(1, 1)
    assert g.nearest(100.0, 1e6) == Alloc(4, 8)
    assert g.nearest(1.0, 256.0) == Alloc(2, 4)
    assert g.nearest(1.2, 290.0) == Alloc(2, 5)  # 2.4 -> 2, 4.53 -> 5
    assert g.nearest(0.9, 250.0) == Alloc(2, 4)  # 1.8 -> 2, 3.9 -> 4 (rounded, not truncated)


@given(grids(), st.data())
def test_nearest_is_on_the_grid_and_nearest(g: ResourceGrid, data) -> None:
    cores = data.draw(st.one_of(st.floats(-1, 1.2 * g.max_cores), st.floats(-10, 1e3)))
    mb = data.draw(st.one_of(st.floats(-1, 1.2 * g.max_mb), st.floats(-100, 1e5)))
    a = g.nearest(cores, mb)
    assert 1 <= a.cpu <= g.cpu_units and 1 <= a.mem <= g.mem_units
    want_cpu = min(range(1, g.cpu_units + 1), key=lambda u: abs(u * g.cpu_unit_cores - cores))
    want_mem = min(range(1, g.mem_units + 1), key=lambda u: abs(u * g.mem_unit_mb - mb))
    # ties may go either way; the chosen point is never farther than the nearest one
    assert abs(g.cores(a.cpu) - cores) <= abs(g.cores(want_cpu) - cores) + 1e-9
    assert abs(g.mb(a.mem) - mb) <= abs(g.mb(want_mem) - mb) + 1e-6


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cpu_unit_cores": 0.0},
        {"cpu_unit_cores": -0.25},
        {"mem_unit_mb": 0.0},
        {"mem_unit_mb": -64.0},
        {"cpu_units": 0},
        {"cpu_units": -1},
        {"mem_units": 0},
    ],
)
def test_invalid_grids_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ResourceGrid(**kwargs)


def test_grid_properties_and_conversions() -> None:
    g = ResourceGrid(cpu_unit_cores=0.5, cpu_units=6, mem_unit_mb=128.0, mem_units=5)
    assert g.n == 30
    assert g.max_cores == 3.0 and g.max_mb == 640.0
    assert g.cores(4) == 2.0 and g.mb(3) == 384.0
    assert math.isclose(g.cores(g.cpu_units), g.max_cores)
    # the cached arrays are stable and the grid is hashable/frozen
    assert g.cand_cpu is g.cand_cpu
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.cpu_units = 3  # type: ignore[misc]
    assert hash(g) == hash(ResourceGrid(0.5, 6, 128.0, 5))


@settings(max_examples=300, deadline=None)
@given(st.floats(-1.0, 40.0, allow_nan=False), st.floats(-10.0, 5000.0, allow_nan=False), st.data())
def test_nearest_remembered_equals_computed(cores: float, mb: float, data) -> None:
    """The remembered grid point of a size is the one computed afresh, also after a reset."""
    g = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
    fresh = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
    want = fresh.nearest(cores, mb)
    for _ in range(data.draw(st.integers(1, 3))):
        assert g.nearest(cores, mb) == want
    g._nearest.clear()
    assert g.nearest(cores, mb) == want
