"""The safeguard (Freyr's rules, the memory floor, the remembered peaks, the burst rule and the
input floor): property tests and worked examples.

The property tests drive a SafeguardState through random sequences of decisions and completions
(with several invocations in flight, failures, peaks at and around the 0.9 thresholds) on random
grids, and check every guard against the rules restated here in physical units (cores / MB).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.core.decision import Decider
from sidecar.core.features import NodeState
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.policy import fallback_scorer
from sidecar.core.safeguard import (
    ACCELERATE,
    DECAY,
    FAILURE,
    FIRST,
    HARVEST,
    MODES,
    RISING,
    Guard,
    SafeguardConfig,
    SafeguardState,
    burst_cores,
    give_back_needed,
    guard,
    remember,
)
from sidecar.core.stats import FunctionStats

CFG = SafeguardConfig()
THR = CFG.threshold


# --------------------------------------------------------------------------------------------
# helpers


def _tol(unit: float) -> float:
    return 1e-6 * unit


def _state(
    last_alloc: Alloc,
    cpu_last: float = 0.0,
    mem_last: float = 0.0,
    cpu_recent: float | None = None,
    mem_recent: float | None = None,
) -> SafeguardState:
    """A calibrated state (the first run is done) with the given peaks."""
    return SafeguardState(
        calibrate=None,
        last_alloc=last_alloc,
        last_cpu_peak_cores=cpu_last,
        last_mem_peak_mb=mem_last,
        recent_cpu_peak_cores=cpu_last if cpu_recent is None else cpu_recent,
        recent_mem_peak_mb=mem_last if mem_recent is None else mem_recent,
    )


def _allowed(g: ResourceGrid, gd: Guard) -> list[Alloc]:
    return [g.alloc(i) for i in np.flatnonzero(gd.mask)]


def _expected_rule(
    user: int,
    last_peak: float,
    last_alloc: int,
    recent: float,
    unit: float,
    top: int,
    margin: float = 1.0,
) -> tuple[str, float, int, int]:
    """(mode, lower requirement in physical units, cap of the lower bound, upper bound);
    ``margin``: units above the recent peak (the reference's 1)."""
    if last_peak > THR * (user * unit):
        return ACCELERATE, recent + margin * unit, top, top
    if last_peak >= THR * last_alloc * unit:
        return RISING, user * unit, user, user
    return HARVEST, recent + margin * unit, user, user


def _check_lo(lo: int, need: float, cap: int, unit: float) -> None:
    """lo is the smallest unit count >= 1 holding ``need``, but never above ``cap``."""
    req = min(need, cap * unit)
    tol = _tol(unit)
    assert 1 <= lo <= max(cap, 1)
    assert lo * unit >= req - tol, (lo, unit, need, cap)
    assert lo == 1 or (lo - 1) * unit < req + tol, (lo, unit, need, cap)


def _mem_margin_units(cfg: SafeguardConfig, st_: SafeguardState, unit: float) -> float:
    """Memory's margin in units, restated: the configured one (one unit after a kill), at least
    ``mem_margin_sd`` deviations of the decayed peaks."""
    margin = cfg.mem_margin_units if st_.failures == 0 else 1.0
    if cfg.mem_margin_sd and st_.mem_peak_w:
        mean = st_.mem_peak_sum / st_.mem_peak_w
        sd = math.sqrt(max(0.0, st_.mem_peak_sq / st_.mem_peak_w - mean**2))
        margin = max(margin, cfg.mem_margin_sd * sd / unit)
    return margin


def check_guard(
    g: ResourceGrid, user: Alloc, st_: SafeguardState, usage: float, cfg: SafeguardConfig, gd: Guard
) -> None:
    """Every rule, restated independently, for one verdict computed from ``st_``."""
    cu, mu = g.cpu_unit_cores, g.mem_unit_mb
    mem_peak = max(st_.recent_mem_peak_mb, st_.mem_peak_memory_mb)  # the remembered peak too
    # ---- structure: ranges on the grid, mask non-empty and exactly the product of the ranges
    assert 1 <= gd.cpu_lo <= gd.cpu_hi <= g.cpu_units
    assert 1 <= gd.mem_lo <= gd.mem_hi <= g.mem_units
    assert gd.cpu_mode in MODES and gd.mem_mode in MODES
    assert gd.mask.dtype == bool and gd.mask.shape == (g.n,)
    assert not gd.mask.flags.writeable  # masks are shared (cached): nobody may edit one
    assert gd.mask.any()
    cpu_ok = (np.arange(1, g.cpu_units + 1) >= gd.cpu_lo) & (
        np.arange(1, g.cpu_units + 1) <= gd.cpu_hi
    )
    mem_ok = (np.arange(1, g.mem_units + 1) >= gd.mem_lo) & (
        np.arange(1, g.mem_units + 1) <= gd.mem_hi
    )
    np.testing.assert_array_equal(
        gd.mask.reshape(g.cpu_units, g.mem_units), np.outer(cpu_ok, mem_ok)
    )
    assert int(gd.mask.sum()) == (gd.cpu_hi - gd.cpu_lo + 1) * (gd.mem_hi - gd.mem_lo + 1)
    for i in range(g.n):
        assert gd.allows(g.alloc(i)) == bool(gd.mask[i])

    # ---- the memory floor wins over everything
    need_mb = usage + cfg.mem_headroom_mb
    # (it holds for a new container, usage 0, too)
    assert gd.mem_lo * mu >= min(need_mb, g.max_mb) - _tol(mu)
    for a in _allowed(g, gd):
        assert a.mem * mu >= min(need_mb, g.max_mb) - _tol(mu)
    fits = need_mb <= user.mem * mu

    # ---- per-resource rules
    if st_.calibrate is not None or st_.last_alloc is None:
        mode = st_.calibrate or FIRST
        assert gd.cpu_mode == gd.mem_mode == mode
        assert gd.calibrating
        cpu = (RISING, user.cpu * cu, user.cpu, user.cpu)
        mem = (RISING, user.mem * mu, user.mem, user.mem)
        assert (gd.cpu_lo, gd.cpu_hi) == (user.cpu, user.cpu)
        if fits:
            assert (gd.mem_lo, gd.mem_hi) == (user.mem, user.mem)
            assert list(np.flatnonzero(gd.mask)) == [g.index(user)]
    else:
        assert not gd.calibrating
        la = st_.last_alloc
        cpu = _expected_rule(
            user.cpu, st_.last_cpu_peak_cores, la.cpu, st_.recent_cpu_peak_cores, cu, g.cpu_units
        )
        mem = _expected_rule(
            user.mem,
            st_.last_mem_peak_mb,
            la.mem,
            mem_peak,
            mu,
            g.mem_units,
            _mem_margin_units(cfg, st_, mu),
        )
        if mem[0] == HARVEST and st_.runs < cfg.mem_harvest_after:  # not harvested yet
            mem = (HARVEST, user.mem * mu, user.mem, user.mem)
        assert gd.cpu_mode == cpu[0]
        assert gd.mem_mode == mem[0]

    # cpu: the rule, then raised to the burst's CPU work per period (never above the user's size)
    _, need, cap, hi = cpu
    burst = min(st_.burst_cores, user.cpu * cu)
    need = max(min(need, cap * cu), burst)
    _check_lo(gd.cpu_lo, need, max(cap, user.cpu), cu)
    assert gd.cpu_hi == max(hi, gd.cpu_lo)
    assert gd.cpu_lo * cu >= burst - _tol(cu)
    # mem: the rule, then raised to the floor
    _, need, cap, hi = mem
    need = max(min(need, cap * mu), min(need_mb, g.max_mb))
    cap = g.mem_units
    _check_lo(gd.mem_lo, need, cap, mu)
    assert gd.mem_hi == max(hi, gd.mem_lo)

    # ---- the brief's statements, literally
    for res, lo_, hi_, mode_, u_units, unit, top, recent, margin in (
        (
            "cpu",
            gd.cpu_lo,
            gd.cpu_hi,
            gd.cpu_mode,
            user.cpu,
            cu,
            g.cpu_units,
            st_.recent_cpu_peak_cores,
            1.0,
        ),
        (
            "mem",
            gd.mem_lo,
            gd.mem_hi,
            gd.mem_mode,
            user.mem,
            mu,
            g.mem_units,
            mem_peak,
            _mem_margin_units(cfg, st_, mu),
        ),
    ):
        bound = recent + margin * unit
        allowed_units = sorted({getattr(a, res) for a in _allowed(g, gd)})
        if mode_ == HARVEST:
            below = [x for x in allowed_units if x < u_units]
            if res == "mem" and st_.runs < cfg.mem_harvest_after:
                assert not below, (allowed_units, st_.runs, cfg.mem_harvest_after)
            if bound > u_units * unit + _tol(unit):
                assert not below, (res, allowed_units, bound)
                if res == "cpu" or fits:
                    assert allowed_units == [u_units]
            for x in below:
                assert x * unit >= bound - _tol(unit), (res, x, bound)
                if res == "cpu":
                    assert x * unit >= st_.burst_cores - _tol(unit), (x, st_.burst_cores)
            assert hi_ == u_units or (res == "mem" and hi_ == lo_ > u_units)
        elif mode_ == ACCELERATE:
            assert hi_ == top
            assert lo_ * unit >= min(bound, top * unit) - _tol(unit)
            if res == "cpu" or usage + cfg.mem_headroom_mb <= bound:  # floor not binding
                assert lo_ == min(top, max(1, math.ceil(bound / unit - 1e-6))) or (
                    lo_ == min(top, max(1, math.ceil(bound / unit + 1e-6)))
                )
        elif mode_ == RISING:
            if res == "cpu" or fits:
                assert (lo_, hi_) == (u_units, u_units)


def check_observe(
    before: SafeguardState,
    after: SafeguardState,
    gd: Guard,
    alloc: Alloc,
    cpu_pk: float,
    mem_pk: float,
    failed: bool,
    burst: float = 0.0,
    user_mb: float = 0.0,
) -> None:
    """``burst``: the invocation's CPU work per period over the period (cores); ``user_mb``: the
    user's memory size."""
    # the remembered peak: decayed, then raised to this peak (to the user's size if it failed)
    assert after.runs == before.runs + 1  # failed runs count too
    need = max(mem_pk, user_mb) if failed else mem_pk
    assert after.mem_peak_memory_mb == max(before.mem_peak_memory_mb * DECAY, need)
    assert after.mem_peak_memory_mb >= mem_pk
    if failed:
        assert after.calibrate == FAILURE
        assert after.failures == before.failures + 1
        assert (
            dataclasses.replace(
                after,
                calibrate=before.calibrate,
                failures=before.failures,
                mem_peak_memory_mb=before.mem_peak_memory_mb,
                runs=before.runs,
            )
            == before
        )
        return
    # the peaks' decayed weight, sum and sum of squares (their spread) take this peak
    assert after.mem_peak_w == before.mem_peak_w * DECAY + 1.0
    assert after.mem_peak_sum == before.mem_peak_sum * DECAY + mem_pk
    assert after.mem_peak_sq == before.mem_peak_sq * DECAY + mem_pk * mem_pk
    assert after.burst_cores == max(before.burst_cores * DECAY, burst)
    assert after.failures == before.failures
    assert after.last_alloc == alloc
    assert after.last_cpu_peak_cores == cpu_pk and after.last_mem_peak_mb == mem_pk
    if gd.cpu_mode in (FIRST, FAILURE, RISING):
        assert after.recent_cpu_peak_cores == cpu_pk
    else:
        assert after.recent_cpu_peak_cores == max(before.recent_cpu_peak_cores, cpu_pk)
    if gd.mem_mode in (FIRST, FAILURE, RISING):
        assert after.recent_mem_peak_mb == mem_pk
    else:
        assert after.recent_mem_peak_mb == max(before.recent_mem_peak_mb, mem_pk)
    assert after.recent_cpu_peak_cores >= after.last_cpu_peak_cores
    assert after.recent_mem_peak_mb >= after.last_mem_peak_mb
    if gd.calibrating:
        assert after.calibrate is None
    else:
        assert after.calibrate == before.calibrate


# --------------------------------------------------------------------------------------------
# strategies

CPU_UNITS = (0.1, 0.25, 0.5, 1.0, 2.0)
MEM_UNITS = (8.0, 16.0, 32.0, 64.0, 128.0, 100.0)


@st.composite
def grids(draw) -> ResourceGrid:
    return ResourceGrid(
        cpu_unit_cores=draw(st.sampled_from(CPU_UNITS)),
        cpu_units=draw(st.integers(1, 12)),
        mem_unit_mb=draw(st.sampled_from(MEM_UNITS)),
        mem_units=draw(st.integers(1, 12)),
    )


@st.composite
def grid_and_user(draw) -> tuple[ResourceGrid, Alloc]:
    g = draw(grids())
    return g, Alloc(draw(st.integers(1, g.cpu_units)), draw(st.integers(1, g.mem_units)))


# a peak as a fraction of some reference; exact thresholds and boundaries are drawn often
fractions = st.one_of(
    st.sampled_from([0.0, 0.5, 0.9, 1.0, 0.89999, 0.90001]),
    st.floats(0.0, 1.3, allow_nan=False),
)
configs = st.builds(
    SafeguardConfig,
    threshold=st.just(0.9),
    mem_headroom_mb=st.sampled_from([0.0, 16.0, 50.0, 64.0]),
    mem_margin_units=st.sampled_from([1.0, 1.0, 0.25, 0.0]),
    mem_harvest_after=st.sampled_from([0, 0, 3, 40]),
    mem_margin_sd=st.sampled_from([0.0, 0.0, 1.0, 2.5]),
)


@st.composite
def peak(draw, unit: float, alloc_units: int, user_units: int) -> float:
    ref = draw(st.sampled_from(["alloc", "user", "units"]))
    f = draw(fractions)
    if ref == "alloc":
        return f * alloc_units * unit
    if ref == "user":
        return f * user_units * unit
    return draw(st.integers(0, 2 * max(alloc_units, user_units))) * unit  # exactly k units


def mem_usage(draw, g: ResourceGrid, user: Alloc) -> float:
    kind = draw(st.sampled_from(["zero", "frac", "big"]))
    if kind == "zero":
        return 0.0
    if kind == "frac":
        return draw(st.floats(0.0, 1.0)) * user.mem * g.mem_unit_mb
    return draw(st.floats(0.0, 2.0)) * g.max_mb


# --------------------------------------------------------------------------------------------
# property tests


@settings(max_examples=150, deadline=None)
@given(data=st.data(), gu=grid_and_user(), cfg=configs)
def test_random_histories_obey_every_rule(data, gu, cfg) -> None:
    """Random interleavings of decisions and completions (several in flight)."""
    g, user = gu
    state = SafeguardState()
    in_flight: list[tuple[Guard, Alloc]] = []
    n_steps = data.draw(st.integers(1, 30), label="steps")
    for _ in range(n_steps):
        complete = in_flight and data.draw(st.booleans(), label="complete?")
        if not complete:
            usage = mem_usage(data.draw, g, user)
            before = dataclasses.replace(state)
            gd = guard(g, user, state, usage, cfg)
            assert state == before  # guard() is pure
            check_guard(g, user, state, usage, cfg, gd)
            choices = np.flatnonzero(gd.mask)
            a = g.alloc(choices[data.draw(st.integers(0, len(choices) - 1), label="pick")])
            assert gd.allows(a)
            in_flight.append((gd, a))
        else:
            k = data.draw(st.integers(0, len(in_flight) - 1), label="which")
            gd, a = in_flight.pop(k)
            cpu_pk = data.draw(peak(g.cpu_unit_cores, a.cpu, user.cpu), label="cpu peak")
            mem_pk = data.draw(peak(g.mem_unit_mb, a.mem, user.mem), label="mem peak")
            failed = data.draw(st.integers(0, 5), label="fail") == 0
            duration = data.draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 5.0]), label="duration")
            cpu_s = data.draw(st.floats(0.0, 2.0), label="cpu work") * max(duration, 0.1) * cpu_pk
            before = dataclasses.replace(state)
            user_mb = user.mem * g.mem_unit_mb
            state.observe(
                gd, a, cpu_pk, mem_pk, failed, cpu_s=cpu_s, duration_s=duration, user_mem_mb=user_mb
            )
            burst = burst_cores(cpu_s, duration, 0.1)
            check_observe(before, state, gd, a, cpu_pk, mem_pk, failed, burst, user_mb)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), gu=grid_and_user(), cfg=configs)
def test_arbitrary_states_obey_every_rule(data, gu, cfg) -> None:
    """Any calibrated state (peaks drawn directly, recent >= last), any memory usage."""
    g, user = gu
    la = Alloc(data.draw(st.integers(1, g.cpu_units)), data.draw(st.integers(1, g.mem_units)))
    cpu_last = data.draw(peak(g.cpu_unit_cores, la.cpu, user.cpu))
    mem_last = data.draw(peak(g.mem_unit_mb, la.mem, user.mem))
    cpu_recent = cpu_last + data.draw(
        st.one_of(st.just(0.0), peak(g.cpu_unit_cores, la.cpu, user.cpu))
    )
    mem_recent = mem_last + data.draw(
        st.one_of(st.just(0.0), peak(g.mem_unit_mb, la.mem, user.mem))
    )
    s = _state(la, cpu_last, mem_last, cpu_recent, mem_recent)
    # remembered peaks and bursts: none, below, at or above the recent ones
    s.mem_peak_memory_mb = data.draw(
        st.one_of(st.just(0.0), peak(g.mem_unit_mb, la.mem, 2 * user.mem))
    )
    s.burst_cores = data.draw(st.one_of(st.just(0.0), peak(g.cpu_unit_cores, la.cpu, user.cpu)))
    s.runs = data.draw(st.integers(1, 50))
    for peak_mb in data.draw(st.lists(peak(g.mem_unit_mb, la.mem, user.mem), max_size=6)):
        s.mem_peak_w = s.mem_peak_w * DECAY + 1.0
        s.mem_peak_sum = s.mem_peak_sum * DECAY + peak_mb
        s.mem_peak_sq = s.mem_peak_sq * DECAY + peak_mb * peak_mb
    usage = mem_usage(data.draw, g, user)
    gd = guard(g, user, s, usage, cfg)
    check_guard(g, user, s, usage, cfg, gd)


@settings(max_examples=100, deadline=None)
@given(gu=grid_and_user(), data=st.data())
def test_first_invocation_runs_at_user_size(gu, data) -> None:
    g, user = gu
    user_mb = user.mem * g.mem_unit_mb
    assume(user_mb >= CFG.mem_headroom_mb)  # else the floor rightly wins over the user's size
    usage = data.draw(st.floats(0.0, user_mb - CFG.mem_headroom_mb))
    gd = guard(g, user, SafeguardState(), usage)
    assert list(np.flatnonzero(gd.mask)) == [g.index(user)]
    assert gd.cpu_mode == gd.mem_mode == FIRST and gd.calibrating


@settings(max_examples=100, deadline=None)
@given(gu=grid_and_user(), data=st.data())
def test_after_a_failure_both_resources_are_pinned(gu, data) -> None:
    g, user = gu
    s = SafeguardState()
    # a few successful runs first, so the state is calibrated and may be harvesting
    for _ in range(data.draw(st.integers(0, 4))):
        gd = guard(g, user, s)
        choices = np.flatnonzero(gd.mask)
        a = g.alloc(choices[data.draw(st.integers(0, len(choices) - 1))])
        s.observe(
            gd,
            a,
            data.draw(peak(g.cpu_unit_cores, a.cpu, user.cpu)),
            data.draw(peak(g.mem_unit_mb, a.mem, user.mem)),
            False,
        )
    gd = guard(g, user, s)
    choices = np.flatnonzero(gd.mask)
    a = g.alloc(choices[data.draw(st.integers(0, len(choices) - 1))])
    s.observe(gd, a, 0.0, 0.0, failed=True)
    user_mb = user.mem * g.mem_unit_mb
    assume(user_mb >= CFG.mem_headroom_mb)  # else the floor rightly wins over the user's size
    usage = data.draw(st.floats(0.0, user_mb - CFG.mem_headroom_mb))
    nxt = guard(g, user, s, usage)
    assert nxt.cpu_mode == nxt.mem_mode == FAILURE and nxt.calibrating
    assert (nxt.cpu_lo, nxt.cpu_hi, nxt.mem_lo, nxt.mem_hi) == (
        user.cpu,
        user.cpu,
        user.mem,
        user.mem,
    )
    assert list(np.flatnonzero(nxt.mask)) == [g.index(user)]
    # it stays pinned until a run succeeds, then the calibration is over
    s.observe(nxt, user, 0.1, 1.0, failed=True)
    assert guard(g, user, s).cpu_mode == FAILURE
    s.observe(guard(g, user, s), user, 0.1, 1.0, failed=False)
    assert s.calibrate is None and not guard(g, user, s).calibrating


@settings(max_examples=150, deadline=None)
@given(gu=grid_and_user(), data=st.data())
def test_harvest_never_below_recent_peak_plus_its_margin(gu, data) -> None:
    """CPU keeps the reference's one unit above the recent peak, memory ``mem_margin_units``."""
    g, user = gu
    assume(user.mem * g.mem_unit_mb >= 2 * CFG.mem_headroom_mb)  # floor not binding at usage 0
    cu, mu = g.cpu_unit_cores, g.mem_unit_mb
    la = Alloc(data.draw(st.integers(1, g.cpu_units)), data.draw(st.integers(1, g.mem_units)))
    # last peaks clearly over-provisioned and not rising -> harvest
    cpu_last = data.draw(st.floats(0.0, 0.8)) * min(user.cpu, la.cpu) * cu
    mem_last = data.draw(st.floats(0.0, 0.8)) * min(user.mem, la.mem) * mu
    cpu_recent = cpu_last + data.draw(st.floats(0.0, 2.0)) * user.cpu * cu
    mem_recent = mem_last + data.draw(st.floats(0.0, 2.0)) * user.mem * mu
    s = _state(la, cpu_last, mem_last, cpu_recent, mem_recent)
    gd = guard(g, user, s)
    margin = CFG.mem_margin_units * mu
    assert gd.cpu_mode == HARVEST and gd.mem_mode == HARVEST
    allowed = _allowed(g, gd)
    assert allowed
    for a in allowed:
        assert a.cpu <= user.cpu and a.mem <= user.mem
        if a.cpu < user.cpu:
            assert a.cpu * cu >= s.recent_cpu_peak_cores + cu - _tol(cu)
        if a.mem < user.mem:
            assert a.mem * mu >= s.recent_mem_peak_mb + margin - _tol(mu)
    if s.recent_cpu_peak_cores + cu > user.cpu * cu + _tol(cu):
        assert {a.cpu for a in allowed} == {user.cpu}
    if s.recent_mem_peak_mb + margin > user.mem * mu + _tol(mu):
        assert {a.mem for a in allowed} == {user.mem}
    # the user's size itself is always allowed while harvesting
    assert gd.allows(user)


@settings(max_examples=100, deadline=None)
@given(gu=grid_and_user(), data=st.data())
def test_accelerate_range_is_recent_peak_plus_one_to_grid_max(gu, data) -> None:
    g, user = gu
    cu = g.cpu_unit_cores
    la = Alloc(data.draw(st.integers(1, g.cpu_units)), user.mem)
    cpu_last = (THR + data.draw(st.floats(1e-6, 1.0))) * user.cpu * cu  # > 0.9 x user
    cpu_recent = cpu_last + data.draw(st.floats(0.0, 3.0)) * cu
    s = _state(la, cpu_last, 0.0, cpu_recent, 0.0)
    gd = guard(g, user, s)
    assert gd.cpu_mode == ACCELERATE
    assert gd.cpu_hi == g.cpu_units
    _check_lo(gd.cpu_lo, cpu_recent + cu, g.cpu_units, cu)
    assert gd.cpu_lo * cu >= min(cpu_recent + cu, g.max_cores) - _tol(cu)
    # every allowed cpu value is at least recent peak + 1 unit, or the grid max
    for a in _allowed(g, gd):
        assert a.cpu * cu >= cpu_recent + cu - _tol(cu) or a.cpu == g.cpu_units


@settings(max_examples=100, deadline=None)
@given(gu=grid_and_user(), data=st.data())
def test_rising_pins_to_user_size(gu, data) -> None:
    g, user = gu
    assume(user.mem * g.mem_unit_mb >= 2 * CFG.mem_headroom_mb)  # floor not binding at usage 0
    cu, mu = g.cpu_unit_cores, g.mem_unit_mb
    # last allocation below the user's size, and the run used >= 0.9 of it (but <= 0.9 x user)
    la = Alloc(data.draw(st.integers(1, user.cpu)), data.draw(st.integers(1, user.mem)))
    f_cpu = data.draw(st.floats(THR, 1.0))
    f_mem = data.draw(st.floats(THR, 1.0))
    cpu_last = min(f_cpu * la.cpu * cu, THR * (user.cpu * cu))
    mem_last = min(f_mem * la.mem * mu, THR * (user.mem * mu))
    if cpu_last < THR * la.cpu * cu or mem_last < THR * la.mem * mu:
        return  # la == user and the clamp made it a harvest; covered elsewhere
    s = _state(
        la,
        cpu_last,
        mem_last,
        data.draw(st.floats(cpu_last, 10 * cpu_last + 1)),
        data.draw(st.floats(mem_last, 10 * mem_last + 1)),
    )
    gd = guard(g, user, s)
    assert gd.cpu_mode == RISING and gd.mem_mode == RISING
    assert list(np.flatnonzero(gd.mask)) == [g.index(user)]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), gu=grid_and_user(), cfg=configs)
def test_memory_never_below_the_floor(data, gu, cfg) -> None:
    g, user = gu
    mu = g.mem_unit_mb
    usage = data.draw(st.floats(1e-3, 3.0 * g.max_mb))
    calibrated = data.draw(st.booleans())
    if calibrated:
        la = Alloc(data.draw(st.integers(1, g.cpu_units)), data.draw(st.integers(1, g.mem_units)))
        s = _state(
            la,
            data.draw(peak(g.cpu_unit_cores, la.cpu, user.cpu)),
            data.draw(peak(mu, la.mem, user.mem)),
        )
    else:
        s = SafeguardState(calibrate=data.draw(st.sampled_from([FIRST, FAILURE])))
    gd = guard(g, user, s, usage, cfg)
    floor = min(g.mem_units, math.ceil((usage + cfg.mem_headroom_mb) / mu - 1e-9))
    assert gd.mem_lo >= floor
    assert all(a.mem >= floor for a in _allowed(g, gd))
    assert gd.mask.any()
    # and the floor also wins over the user's size when usage is beyond it
    if floor > user.mem:
        assert not gd.allows(user)


# --------------------------------------------------------------------------------------------
# worked examples


G1 = ResourceGrid(cpu_unit_cores=1.0, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
USER = Alloc(4, 4)  # 4 cores, 256 MB


def test_example_first_invocation() -> None:
    gd = guard(G1, USER, SafeguardState())
    assert (gd.cpu_lo, gd.cpu_hi, gd.mem_lo, gd.mem_hi) == (4, 4, 4, 4)
    assert gd.reason == "cpu=first,mem=first"
    assert list(np.flatnonzero(gd.mask)) == [G1.index(USER)]


def test_example_harvest_cpu() -> None:
    # user 4 cpu units, last peak 1.2 cores, last alloc 3 -> harvest [ceil(1.2 + 1), 4] = [3, 4]
    s = _state(Alloc(3, 4), cpu_last=1.2, mem_last=100.0)
    gd = guard(G1, USER, s)
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode) == (3, 4, HARVEST)
    # memory: 100 MB <= 0.9 x 256 and < 0.9 x 256 (last alloc) -> harvest from the peak plus a
    # quarter unit, [ceil(116 / 64), 4]; the reference's whole unit: [ceil(164 / 64), 4]
    assert (gd.mem_lo, gd.mem_hi, gd.mem_mode) == (2, 4, HARVEST)
    assert int(gd.mask.sum()) == 2 * 3
    assert gd.allows(Alloc(3, 2)) and gd.allows(USER) and not gd.allows(Alloc(2, 4))
    assert guard(G1, USER, s, cfg=SafeguardConfig(mem_margin_units=1.0)).mem_lo == 3


def test_example_harvest_uses_recent_not_last_peak() -> None:
    # last peak 0.5 core, but a peak of 2.5 cores was seen since the last safeguard run
    s = _state(Alloc(4, 4), cpu_last=0.5, cpu_recent=2.5, mem_last=10.0)
    gd = guard(G1, USER, s)
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode) == (4, 4, HARVEST)  # ceil(3.5) = 4
    s = _state(Alloc(4, 4), cpu_last=0.5, cpu_recent=1.5, mem_last=10.0)
    assert guard(G1, USER, s).cpu_lo == 3


def test_example_harvest_bound_above_user_gives_only_user_size() -> None:
    s = _state(Alloc(8, 4), cpu_last=1.0, cpu_recent=3.5, mem_last=10.0)
    gd = guard(G1, USER, s)
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode) == (4, 4, HARVEST)


def test_example_harvest_exact_unit_peak() -> None:
    # a peak of exactly 2 cores needs 3 units (peak + 1 unit), not 2
    s = _state(Alloc(4, 4), cpu_last=2.0, mem_last=10.0)
    assert guard(G1, USER, s).cpu_lo == 3
    # a peak of 0 still needs one unit
    s = _state(Alloc(4, 4), cpu_last=0.0, mem_last=0.0)
    gd = guard(G1, USER, s)
    assert (gd.cpu_lo, gd.mem_lo) == (1, 1)


def test_example_rising() -> None:
    # last given 2 cores, used 1.9 (>= 0.9 x 2) and 1.9 <= 0.9 x 4 -> rising: pin to the user's 4
    s = _state(Alloc(2, 2), cpu_last=1.9, mem_last=120.0)  # mem: 120 >= 0.9 x 128 -> rising too
    gd = guard(G1, USER, s)
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode) == (4, 4, RISING)
    assert (gd.mem_lo, gd.mem_hi, gd.mem_mode) == (4, 4, RISING)
    assert not gd.calibrating


def test_example_accelerate() -> None:
    # last peak 3.8 cores > 0.9 x 4 -> accelerate within [ceil(3.8 + 1), 8] = [5, 8]
    s = _state(Alloc(4, 4), cpu_last=3.8, mem_last=250.0)
    gd = guard(G1, USER, s)
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode) == (5, 8, ACCELERATE)
    # 250 MB > 0.9 x 256 -> accelerate within [ceil((250 + 64) / 64), 8] = [5, 8]
    assert (gd.mem_lo, gd.mem_hi, gd.mem_mode) == (5, 8, ACCELERATE)
    # a recent peak near the grid max clamps the lower bound to the max
    s = _state(Alloc(8, 4), cpu_last=7.5, mem_last=10.0)
    gd = guard(G1, USER, s)
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode) == (8, 8, ACCELERATE)


def test_example_an_acceleration_may_be_declined_while_invocations_wait() -> None:
    """With ``decline_when_queued``, a waiting invocation opens the accelerate range down to the
    user's size (and never below it); nothing waiting, or the option off: Freyr's range."""
    s = _state(Alloc(4, 4), cpu_last=3.8, mem_last=250.0)
    on = SafeguardConfig(decline_when_queued=True)
    gd = guard(G1, USER, s, cfg=on, pending=3)
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode) == (4, 8, ACCELERATE)
    assert (gd.mem_lo, gd.mem_hi, gd.mem_mode) == (4, 8, ACCELERATE)
    assert gd.allows(USER) and not gd.allows(Alloc(3, 4))
    for cfg, pending in ((on, 0), (SafeguardConfig(decline_when_queued=False), 3)):
        gd = guard(G1, USER, s, cfg=cfg, pending=pending)
        assert (gd.cpu_lo, gd.mem_lo) == (5, 5) and not gd.allows(USER)
    # harvest and rising ranges do not depend on the queue
    s = _state(Alloc(4, 4), cpu_last=1.0, mem_last=250.0)
    gd = guard(G1, USER, s, cfg=on, pending=3)
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode) == (2, 4, HARVEST)


def test_example_a_tighter_memory_margin() -> None:
    """``mem_margin_units`` moves memory's lower bound from the recent peak + 1 unit toward the
    peak itself, in harvest and accelerate alike; CPU keeps the reference's unit."""
    s = _state(Alloc(4, 8), cpu_last=1.0, mem_last=100.0)  # harvest both (user 4 cores, 256 MB)
    for margin, mem_lo in ((1.0, 3), (0.5, 3), (0.25, 2), (0.0, 2)):
        # ceil(100 / 64 + margin): 2.56 -> 3, 2.06 -> 3, 1.81 -> 2, 1.56 -> 2
        gd = guard(G1, USER, s, cfg=SafeguardConfig(mem_margin_units=margin))
        assert (gd.mem_lo, gd.mem_hi, gd.mem_mode) == (mem_lo, 4, HARVEST), margin
        assert (gd.cpu_lo, gd.cpu_hi) == (2, 4), margin
    # the remembered peak and the floor still bind under a tight margin
    s.mem_peak_memory_mb = 150.0
    gd = guard(G1, USER, s, cfg=SafeguardConfig(mem_margin_units=0.0))
    assert gd.mem_lo == 3  # ceil(150 / 64)
    gd = guard(G1, USER, s, mem_usage_mb=180.0, cfg=SafeguardConfig(mem_margin_units=0.0))
    assert gd.mem_lo == 4  # ceil((180 + 16) / 64)
    s = _state(Alloc(4, 4), cpu_last=3.8, mem_last=250.0)  # accelerate
    gd = guard(G1, USER, s, cfg=SafeguardConfig(mem_margin_units=0.25))
    assert (gd.mem_lo, gd.mem_hi, gd.mem_mode) == (5, 8, ACCELERATE)  # ceil(3.91 + 0.25)
    assert gd.cpu_lo == 5
    # a function OOM-killed once keeps the reference's unit: ceil(100 / 64 + 1) = 3
    s = _state(Alloc(4, 8), cpu_last=1.0, mem_last=100.0)
    s.failures = 1
    assert guard(G1, USER, s, cfg=SafeguardConfig(mem_margin_units=0.25)).mem_lo == 3


def test_example_memory_is_harvested_only_after_a_functions_first_calls() -> None:
    """A function whose third call spikes to 200 MB (usually 40): harvested from its second call,
    that spike meets a 64 MB limit; with ``mem_harvest_after = 5`` it runs at the user's 256 MB,
    and the remembered spike keeps the limit there afterwards."""
    for after, lo_at_call in ((0, {2: 1, 3: 1}), (5, {2: 4, 3: 4, 4: 4, 5: 4, 6: 4})):
        cfg = SafeguardConfig(mem_harvest_after=after)
        s = SafeguardState()
        for call in range(1, 7):
            gd = guard(G1, USER, s, cfg=cfg)
            if call > 1:
                assert gd.mem_mode == HARVEST, (after, call)
                assert gd.cpu_lo == 2, (after, call)  # CPU is harvested from the second call
            if call in lo_at_call:
                assert gd.mem_lo == lo_at_call[call], (after, call)
            a = Alloc(gd.cpu_lo, gd.mem_lo)  # `smallest`
            peak = 200.0 if call == 3 else 40.0
            killed = peak > a.mem * G1.mem_unit_mb
            assert killed == (after == 0 and call == 3), (after, call)
            s.observe(gd, a, 0.1, min(peak, a.mem * 64.0), killed, user_mem_mb=256.0)
            if killed:
                break
        assert s.runs == call


@settings(max_examples=100, deadline=None)
@given(peaks=st.lists(st.floats(0.0, 4096.0), min_size=1, max_size=300))
def test_the_peaks_spread_is_their_decayed_standard_deviation(peaks) -> None:
    """``mem_peak_sd`` is the standard deviation of the successful runs' peaks weighted
    ``DECAY**age``, as numpy computes it; failed runs do not count."""
    s = SafeguardState()
    gd = guard(G1, USER, s)
    for p in peaks:
        s.observe(gd, USER, 0.5, p, False, user_mem_mb=256.0)
        s.observe(gd, USER, 0.5, 9999.0, True, user_mem_mb=256.0)  # a kill: not a peak
    w = DECAY ** np.arange(len(peaks))[::-1]
    want = math.sqrt(np.cov(peaks, aweights=w, bias=True)) if len(peaks) > 1 else 0.0
    assert s.mem_peak_sd == pytest.approx(want, rel=1e-6, abs=1e-3 * (1.0 + max(peaks)))


def test_example_a_margin_from_the_functions_spread() -> None:
    """``mem_margin_sd``: a function whose peaks vary by 40 MB (sd 20) gets 2 x 20 MB above its
    peak, more than a quarter unit; a steady one keeps the quarter unit."""
    cfg = SafeguardConfig(mem_margin_units=0.25, mem_margin_sd=2.0)
    for peaks, mem_lo in (([60.0, 100.0] * 10, 3), ([100.0] * 20, 2)):
        s = SafeguardState()
        gd = guard(G1, USER, s, cfg=cfg)
        for p in peaks:
            s.observe(gd, Alloc(4, 4), 0.5, p, False, user_mem_mb=256.0)
            gd = guard(G1, USER, s, cfg=cfg)
        assert gd.mem_mode == HARVEST
        # ceil((100 + max(16, 2 x sd)) / 64): sd ~20 -> 140 / 64 -> 3; sd 0 -> 116 / 64 -> 2
        assert gd.mem_lo == mem_lo, (peaks[:2], s.mem_peak_sd)
        off = guard(G1, USER, s, cfg=SafeguardConfig(mem_margin_units=0.25))
        assert off.mem_lo == 2


def test_the_decision_path_hands_the_nodes_queue_to_the_guard() -> None:
    """``Decider.decide`` guards with the node's ``pending``: `smallest` declines the acceleration
    (takes the user's size) only while invocations wait, and only with the option on."""
    s = _state(Alloc(4, 4), cpu_last=3.8, mem_last=250.0)
    smallest = fallback_scorer("smallest")
    for cfg, pending, want in (
        (SafeguardConfig(decline_when_queued=True), 2, USER),
        (SafeguardConfig(decline_when_queued=True), 0, Alloc(5, 5)),
        (SafeguardConfig(decline_when_queued=False), 2, Alloc(5, 5)),
    ):
        node = NodeState(8.0, 512.0, 4.0, 256.0, pending)
        d = Decider(G1, cfg).decide(smallest, node, FunctionStats(), s, USER, 0.0)
        assert G1.alloc(d.action) == want, (cfg, pending)


def test_example_threshold_boundaries() -> None:
    g = ResourceGrid(cpu_unit_cores=1.0, cpu_units=12, mem_unit_mb=64.0, mem_units=8)
    user = Alloc(10, 4)
    # exactly 0.9 x user is still over-provisioned; exactly 0.9 x last alloc is rising
    s = _state(Alloc(10, 4), cpu_last=9.0, mem_last=10.0)
    assert guard(g, user, s).cpu_mode == RISING
    s = _state(Alloc(10, 4), cpu_last=9.0 + 1e-6, mem_last=10.0)
    gd = guard(g, user, s)
    assert (gd.cpu_mode, gd.cpu_lo, gd.cpu_hi) == (ACCELERATE, 11, 12)
    s = _state(Alloc(10, 4), cpu_last=9.0 - 1e-6, mem_last=10.0)
    assert guard(g, user, s).cpu_mode == HARVEST


def test_example_fractional_cpu_units() -> None:
    g = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=4)
    user = Alloc(8, 2)  # 2 cores, 128 MB
    # last given 1.5 cores, peak 0.6 core: harvest within [ceil((0.6 + 0.25) / 0.25), 8] = [4, 8]
    s = _state(Alloc(6, 2), cpu_last=0.6, mem_last=20.0)
    gd = guard(g, user, s)
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode) == (4, 8, HARVEST)
    assert g.cores(gd.cpu_lo) >= 0.6 + 0.25
    # peak of exactly 0.75 core (3 units): needs 4 units
    s = _state(Alloc(6, 2), cpu_last=0.75, mem_last=20.0)
    assert guard(g, user, s).cpu_lo == 4
    # peak of 0.3 core (as a float, 3 * 0.1): ceil(1.2 + 1) = 3
    s = _state(Alloc(6, 2), cpu_last=3 * 0.1, mem_last=20.0)
    assert guard(g, user, s).cpu_lo == 3
    # accelerate: peak 1.9 > 0.9 x 2 -> [ceil(2.15 / 0.25), 8] = [9 -> clamped 8, 8]
    s = _state(Alloc(8, 2), cpu_last=1.9, mem_last=20.0)
    gd = guard(g, user, s)
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode) == (8, 8, ACCELERATE)


def test_example_memory_floor() -> None:
    # first invocation in a warm container already using 300 MB: floor ceil(316 / 64) = 5 > user 4
    gd = guard(G1, USER, SafeguardState(), mem_usage_mb=300.0)
    assert (gd.cpu_lo, gd.cpu_hi) == (4, 4)
    assert (gd.mem_lo, gd.mem_hi) == (5, 5)
    # beyond the grid: clamped to the grid max, the mask stays non-empty
    gd = guard(G1, USER, SafeguardState(), mem_usage_mb=5000.0)
    assert (gd.mem_lo, gd.mem_hi) == (8, 8) and gd.mask.any()
    # harvesting memory: rule gives [ceil((50 + 64) / 64), 4] = [2, 4]; usage 200 -> floor 4
    s = _state(Alloc(4, 4), cpu_last=1.0, mem_last=50.0)
    assert (guard(G1, USER, s).mem_lo, guard(G1, USER, s).mem_hi) == (2, 4)
    gd = guard(G1, USER, s, mem_usage_mb=200.0)
    assert (gd.mem_lo, gd.mem_hi, gd.mem_mode) == (4, 4, HARVEST)
    # a floor below the rule's bound changes nothing
    gd = guard(G1, USER, s, mem_usage_mb=10.0)
    assert (gd.mem_lo, gd.mem_hi) == (2, 4)
    # headroom is configurable
    gd = guard(G1, USER, s, mem_usage_mb=100.0, cfg=SafeguardConfig(mem_headroom_mb=100.0))
    assert gd.mem_lo == 4  # ceil(200 / 64)


def test_example_memory_floor_exact_boundary() -> None:
    # usage + headroom of exactly 3 units needs 3 units, not 4
    s = _state(Alloc(4, 4), cpu_last=1.0, mem_last=10.0)
    gd = guard(G1, USER, s, mem_usage_mb=192.0 - 16.0)
    assert gd.mem_lo == 3


def test_memory_floor_applies_to_a_new_container() -> None:
    g = ResourceGrid(cpu_unit_cores=1.0, cpu_units=4, mem_unit_mb=8.0, mem_units=8)
    user = Alloc(4, 8)
    s = _state(Alloc(4, 8), cpu_last=1.0, mem_last=0.0)  # recent mem peak 0 -> rule allows 1 unit
    gd = guard(g, user, s, mem_usage_mb=0.0)  # floor = ceil((0 + 16) / 8) = 2
    assert gd.mem_lo >= 2


def test_example_walk_through_a_history() -> None:
    s = SafeguardState()
    gd = guard(G1, USER, s)
    assert gd.cpu_mode == FIRST
    s.observe(gd, USER, cpu_peak_cores=1.2, mem_peak_mb=100.0, failed=False)
    assert s.calibrate is None and s.last_alloc == USER
    assert (s.recent_cpu_peak_cores, s.recent_mem_peak_mb) == (1.2, 100.0)

    gd = guard(G1, USER, s)  # harvest cpu [3, 4], mem [2, 4] (100 MB + a quarter unit)
    assert (gd.cpu_mode, gd.cpu_lo, gd.mem_mode, gd.mem_lo) == (HARVEST, 3, HARVEST, 2)
    s.observe(gd, Alloc(3, 3), cpu_peak_cores=0.8, mem_peak_mb=90.0, failed=False)
    assert (s.recent_cpu_peak_cores, s.recent_mem_peak_mb) == (1.2, 100.0)  # max, not reset

    gd = guard(G1, USER, s)
    assert (gd.cpu_lo, gd.cpu_hi) == (3, 4)  # still bounded by the recent 1.2
    s.observe(gd, Alloc(3, 3), cpu_peak_cores=2.8, mem_peak_mb=90.0, failed=False)
    gd = guard(G1, USER, s)  # 2.8 >= 0.9 x 3 and <= 3.6: rising -> user size, resets the peak
    assert (gd.cpu_mode, gd.cpu_lo, gd.cpu_hi) == (RISING, 4, 4)
    assert gd.mem_mode == HARVEST
    s.observe(gd, Alloc(4, 3), cpu_peak_cores=0.5, mem_peak_mb=95.0, failed=False)
    assert s.recent_cpu_peak_cores == 0.5 and s.recent_mem_peak_mb == 100.0
    gd = guard(G1, USER, s)
    assert (gd.cpu_mode, gd.cpu_lo) == (HARVEST, 2)

    s.observe(gd, Alloc(2, 3), cpu_peak_cores=0.5, mem_peak_mb=95.0, failed=True)
    assert s.failures == 1 and s.calibrate == FAILURE
    assert s.last_alloc == Alloc(4, 3)  # a failed run records nothing else
    gd = guard(G1, USER, s)
    assert gd.reason == "cpu=failure,mem=failure"
    assert (gd.cpu_lo, gd.cpu_hi, gd.mem_lo, gd.mem_hi) == (4, 4, 4, 4)
    s.observe(gd, USER, cpu_peak_cores=0.4, mem_peak_mb=60.0, failed=False)
    assert s.calibrate is None
    assert (s.recent_cpu_peak_cores, s.recent_mem_peak_mb) == (0.4, 60.0)  # reset by calibration


# --------------------------------------------------------------------------------------------
# give-back


def test_give_back_examples() -> None:
    cfg = SafeguardConfig()
    # harvested 2 of the user's 4 cores: give back once usage reaches 0.9 x 2 = 1.8
    assert not give_back_needed(1.79, 2.0, 4.0, cfg)
    assert give_back_needed(1.8, 2.0, 4.0, cfg)
    assert give_back_needed(2.0, 2.0, 4.0, cfg)
    # at (or above) the user's size there is nothing to give back
    assert not give_back_needed(4.0, 4.0, 4.0, cfg)
    assert not give_back_needed(10.0, 6.0, 4.0, cfg)
    # memory in MB, custom threshold
    cfg2 = SafeguardConfig(give_back_threshold=0.5)
    assert give_back_needed(64.0, 128.0, 256.0, cfg2)
    assert not give_back_needed(63.9, 128.0, 256.0, cfg2)


@given(
    usage=st.floats(0, 1e4),
    allocated=st.floats(0.01, 1e4),
    user=st.floats(0.01, 1e4),
    thr=st.floats(0.1, 1.0),
)
def test_give_back_property(usage: float, allocated: float, user: float, thr: float) -> None:
    cfg = SafeguardConfig(give_back_threshold=thr)
    got = give_back_needed(usage, allocated, user, cfg)
    assert got == (allocated < user and usage >= thr * allocated)
    if allocated >= user:
        assert not got
    if got:  # monotone: more usage still needs the give-back
        assert give_back_needed(usage * 2 + 1, allocated, user, cfg)


# --------------------------------------------------------------------------------------------
# the input floor (an invoker that reports input sizes)


def test_example_input_floor_a_larger_input_keeps_the_memory_it_will_need() -> None:
    # memhog-like: 10 MB idle worker, grows ~1 MB per input unit; user 512 MB on 64 MB units
    user = Alloc(2, 8)
    s = SafeguardState()
    gd = guard(G1, user, s, mem_usage_mb=10.0, input_size=50.0)  # first run: user's size
    s.observe(gd, user, 1.0, mem_peak_mb=62.0, failed=False, input_size=50.0, mem_start_mb=10.0)
    assert (s.input_growth_mb, s.input_max) == (52.0, 50.0)
    # the peak rule alone would harvest down to ceil((62 + 64) / 64) = 2 units (128 MB) ...
    assert guard(G1, user, s, mem_usage_mb=10.0).mem_lo == 2
    # ... which a 250-unit input (~270 MB) would blow: the input floor scales the growth by
    # 250 / 50 and keeps ceil((10 + 52 x 5 + 16) / 64) = 5 units (320 MB)
    gd = guard(G1, user, s, mem_usage_mb=10.0, input_size=250.0)
    assert (gd.mem_lo, gd.mem_hi, gd.mem_mode) == (5, 8, HARVEST)
    assert all(a.mem >= 5 for a in _allowed(G1, gd))
    # a small input is harvested as before; an input beyond the user's size gets the user's size
    assert guard(G1, user, s, mem_usage_mb=10.0, input_size=20.0).mem_lo == 2
    assert guard(G1, user, s, mem_usage_mb=10.0, input_size=5000.0).mem_lo == 8


def test_input_floor_of_a_function_with_a_fixed_part_does_not_pin_large_inputs() -> None:
    # growth 100 MB + 0.1 MB per unit: the smallest input (10) has the largest growth per unit
    # (10.1 MB), which would pin an input of 100 at ceil((20 + 1010 + 16) / 64) = 8 units. The
    # largest growth seen, scaled by how far the input exceeds the largest input, keeps what it
    # needs (110 MB) and no more.
    user = Alloc(2, 8)
    s = _state(user, cpu_last=1.0, mem_last=130.0)
    gd = guard(G1, user, s, mem_usage_mb=20.0)
    for x in (10.0, 100.0):
        s.observe(gd, user, 1.0, 20.0 + 100.0 + 0.1 * x, False, input_size=x, mem_start_mb=20.0)
    assert s.input_growth_mb == pytest.approx(110.0)
    assert s.input_max == pytest.approx(100.0)
    gd = guard(G1, user, s, mem_usage_mb=20.0, input_size=100.0)
    # the peak rule's ceil((130 + 16) / 64) = 3 units; the input floor needs 146 MB, no more
    assert gd.mem_lo == guard(G1, user, s, mem_usage_mb=20.0).mem_lo == 3
    gd = guard(G1, user, s, mem_usage_mb=20.0, input_size=400.0)  # beyond anything seen
    assert gd.mem_lo == math.ceil((20.0 + 110.0 * 4 + 16.0) / 64.0)  # 476 MB: 8 units
    # a true growth 100 + 0.1 x never exceeds the floor's growth for any larger input
    for x in (100.0, 150.0, 400.0, 1e4):
        assert 100.0 + 0.1 * x <= 110.0 * max(1.0, x / s.input_max) + 1e-9


def test_input_floor_ignores_what_does_not_grow_and_remembers_the_largest_growth() -> None:
    user = Alloc(2, 8)
    s = _state(user, cpu_last=1.0, mem_last=20.0)
    gd = guard(G1, user, s, mem_usage_mb=20.0, input_size=1000.0)
    s.observe(gd, user, 1.0, 20.0, False, input_size=1000.0, mem_start_mb=20.0)  # flat
    assert s.input_growth_mb == 0.0
    # nothing added to the peak rule's ceil((20 + 16) / 64) = 1 unit
    assert guard(G1, user, s, mem_usage_mb=20.0, input_size=9000.0).mem_lo == 1
    s.observe(gd, user, 1.0, 120.0, False, input_size=100.0, mem_start_mb=20.0)
    s.observe(gd, user, 1.0, 60.0, False, input_size=100.0, mem_start_mb=20.0)
    assert s.input_growth_mb == pytest.approx(100.0 * DECAY)  # the largest, decayed once
    # an OOM-killed run's peak is a lower bound on its need: it counts too
    s.observe(gd, Alloc(2, 2), 1.0, 200.0, True, input_size=50.0, mem_start_mb=20.0)
    assert s.input_growth_mb == pytest.approx(180.0)


# --------------------------------------------------------------------------------------------
# remembered peaks and bursts


def test_remember_is_a_decayed_maximum_with_the_documented_half_life() -> None:
    m = remember(0.0, 100.0)
    assert m == 100.0
    for _ in range(100):
        m = remember(m, 10.0)
    assert m == pytest.approx(50.0)  # one half-life later
    assert remember(m, 80.0) == 80.0  # a new, larger value wins at once
    for _ in range(1000):
        m = remember(m, 10.0)
    assert m == pytest.approx(10.0)  # and the memory sinks to what is seen now


def _spiky_function_ooms(forget: bool) -> tuple[int, int]:
    """(OOM kills, lowest memory units allowed after the first spike) over 200 calls of the
    compression function: 30 MB usually, ~8x (240 MB) in every 20th call; user 256 MB on 32 MB
    units, decided by the policy that harvests the most memory it may. ``forget``: Freyr's rule
    alone (the remembered peak wiped after every call)."""
    g = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=32.0, mem_units=8)
    user = Alloc(4, 8)
    s = SafeguardState()
    kills, lowest = 0, g.mem_units
    for call in range(1, 201):
        gd = guard(g, user, s, mem_usage_mb=0.0)
        a = Alloc(user.cpu, gd.mem_lo)
        need = 240.0 if call % 20 == 0 else 30.0
        oom = a.mem * g.mem_unit_mb < need
        kills += oom
        s.observe(gd, a, 0.5, min(need, a.mem * g.mem_unit_mb), oom, user_mem_mb=256.0)
        if forget:
            s.mem_peak_memory_mb = 0.0
        if call > 20:
            lowest = min(lowest, gd.mem_lo)
    return kills, lowest


def test_a_spike_every_20th_call_is_not_forgotten_after_a_reset() -> None:
    kills, lowest = _spiky_function_ooms(forget=False)
    assert kills == 1  # only the first spike, never seen before
    assert lowest * 32.0 >= 240.0
    # Freyr's recent peak alone is reset by the pinned run after each kill: every spike is killed
    kills, lowest = _spiky_function_ooms(forget=True)
    assert kills == 10 and lowest * 32.0 < 240.0


def test_example_a_burst_is_not_harvested_below_its_work_per_period() -> None:
    # matmul-like: 80 ms of CPU work on 2 threads in 40 ms, user 1 core on 0.25-core units. The
    # 100 ms samples read 0.8 cores (80 ms in one window): the peak rule alone allows 0.8 + 0.25
    # -> 5 units, which fits; if a window read only 0.4 it would allow 3 units (0.75 core), and
    # 80 ms of work would wait for a second period. The burst rule keeps ceil(0.8 / 0.25) = 4.
    g = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
    user = Alloc(4, 4)
    s = SafeguardState()
    gd = guard(g, user, s)
    s.observe(gd, user, 0.4, 100.0, False, cpu_s=0.08, duration_s=0.04, period_s=0.1)
    assert s.burst_cores == pytest.approx(0.8)
    s.recent_cpu_peak_cores = s.last_cpu_peak_cores = 0.4  # as the windows under-read it
    gd = guard(g, user, s)
    assert gd.cpu_mode == HARVEST and (gd.cpu_lo, gd.cpu_hi) == (4, 4)
    # a long run's work per period is its mean rate: no more than its peak asks already
    assert burst_cores(2.0, 5.0, 0.1) == pytest.approx(0.4)
    # work that fits a quarter of a period leaves room to harvest
    s = SafeguardState()
    s.observe(guard(g, user, s), user, 0.4, 100.0, False, cpu_s=0.02, duration_s=0.01)
    s.recent_cpu_peak_cores = s.last_cpu_peak_cores = 0.1
    assert guard(g, user, s).cpu_lo == 2  # the peak rule's ceil((0.1 + 0.25) / 0.25)
    # the rule never raises CPU above the user's size
    s.burst_cores = 5.0
    assert guard(g, user, s).cpu_lo == user.cpu


@settings(max_examples=150, deadline=None)
@given(data=st.data(), gu=grid_and_user(), cfg=configs)
def test_input_floor_only_raises_memory_and_never_above_the_user_size(data, gu, cfg) -> None:
    g, user = gu
    la = Alloc(data.draw(st.integers(1, g.cpu_units)), data.draw(st.integers(1, g.mem_units)))
    s = _state(
        la,
        data.draw(peak(g.cpu_unit_cores, la.cpu, user.cpu)),
        data.draw(peak(g.mem_unit_mb, la.mem, user.mem)),
    )
    s.input_growth_mb = data.draw(st.floats(0.0, 2.0 * g.max_mb))
    s.input_max = data.draw(st.floats(1e-3, 1e4))
    usage = data.draw(st.floats(0.0, 2.0 * g.max_mb))
    size = data.draw(st.floats(0.0, 1e4))
    gd = guard(g, user, s, usage, cfg, input_size=size)
    need = usage + s.input_growth_mb * max(1.0, size / s.input_max) + cfg.mem_headroom_mb
    assert gd.mask.any()
    assert all(a.mem >= min(user.mem, g.mem_units_ceil(need)) for a in _allowed(g, gd))
    base = guard(g, user, s, usage, cfg)  # the same decision without the input
    assert (gd.cpu_lo, gd.cpu_hi, gd.cpu_mode, gd.mem_mode) == (
        base.cpu_lo,
        base.cpu_hi,
        base.cpu_mode,
        base.mem_mode,
    )
    assert base.mem_lo <= gd.mem_lo <= max(base.mem_lo, user.mem) and gd.mem_hi >= base.mem_hi
