"""The per-invocation reward."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.reward import RewardConfig, held_ratio, invocation_reward

CFG = RewardConfig()


@given(st.floats(1e-3, 1e5))
def test_fixed_like_run_gives_zero(base: float) -> None:
    assert invocation_reward(base, base) == pytest.approx(0.0, abs=1e-12)


def test_examples() -> None:
    assert invocation_reward(0.5, 1.0) == pytest.approx(0.5)  # 2x faster
    assert invocation_reward(1.5, 1.0) == pytest.approx(-0.5 - 4.0 * 0.5)  # 1.5x slower
    assert invocation_reward(1.0, 1.0, queue_s=0.25, cold_s=0.25) == pytest.approx(-0.5)
    assert invocation_reward(1.0, 1.0, failed=True) == pytest.approx(-5.0)
    assert invocation_reward(0.0, 1.0) == 1.0


@given(base=st.floats(1e-3, 1e4), f=st.floats(0.0, 0.999))
def test_speed_up_is_positive(base: float, f: float) -> None:
    r = invocation_reward(f * base, base)
    assert 0 < r <= 1.0
    assert r == pytest.approx(1.0 - f, rel=1e-9, abs=1e-12)


@given(base=st.floats(1e-3, 1e4), d=st.floats(0.01, 0.99))
def test_slowdown_is_punished_more_than_the_same_speed_up_is_rewarded(
    base: float, d: float
) -> None:
    fast = invocation_reward((1 - d) * base, base)
    slow = invocation_reward((1 + d) * base, base)
    assert fast > 0 > slow
    assert -slow > fast
    assert -slow == pytest.approx((1 + CFG.slowdown_weight) * d, rel=1e-6)


@given(exec_s=st.floats(0, 10), base=st.floats(0.1, 10))
def test_failure_is_penalised(exec_s: float, base: float) -> None:
    ok = invocation_reward(exec_s, base)
    bad = invocation_reward(exec_s, base, failed=True)
    assert bad < ok or bad == -CFG.clip
    assert bad <= 1.0 - CFG.failure_penalty


@given(exec_s=st.floats(0, 10), base=st.floats(0.1, 10), q=st.floats(0.001, 10), c=st.floats(0, 10))
def test_delay_is_penalised(exec_s: float, base: float, q: float, c: float) -> None:
    r0 = invocation_reward(exec_s, base)
    r = invocation_reward(exec_s, base, queue_s=q, cold_s=c)
    assert r < r0 or r == -CFG.clip
    # queueing and cold start cost the same per second
    assert invocation_reward(exec_s, base, queue_s=q) == invocation_reward(exec_s, base, cold_s=q)


@given(
    exec_s=st.floats(0, 1e6),
    base=st.floats(0, 1e6),
    q=st.floats(0, 1e6),
    c=st.floats(0, 1e6),
    failed=st.booleans(),
)
def test_reward_is_clipped(exec_s, base, q, c, failed) -> None:
    r = invocation_reward(exec_s, base, q, c, failed)
    assert math.isfinite(r)
    assert -CFG.clip <= r <= 1.0


def test_clipping_examples() -> None:
    assert invocation_reward(100.0, 1.0) == -CFG.clip
    assert invocation_reward(0.0, 1.0, failed=True) == pytest.approx(1.0 - 5.0)
    assert invocation_reward(1.0, 1.0, queue_s=1e6) == -CFG.clip
    cfg = RewardConfig(clip=2.0)
    assert invocation_reward(1.0, 1.0, failed=True, cfg=cfg) == -2.0
    # a zero baseline is treated as 1 ms instead of dividing by zero
    assert invocation_reward(0.0, 0.0) == 1.0
    assert invocation_reward(1e-3, 0.0) == pytest.approx(0.0)


def test_config_weights_are_used() -> None:
    cfg = RewardConfig(slowdown_weight=0.0, tolerance=1.0, delay_weight=2.0, failure_penalty=1.0)
    assert invocation_reward(2.0, 1.0, cfg=cfg) == pytest.approx(-1.0)
    assert invocation_reward(1.0, 1.0, queue_s=1.0, cfg=cfg) == pytest.approx(-2.0)
    assert invocation_reward(1.0, 1.0, failed=True, cfg=cfg) == pytest.approx(-1.0)
    # slow-downs within the tolerance are only penalised linearly
    cfg = RewardConfig(tolerance=1.5)
    assert invocation_reward(1.4, 1.0, cfg=cfg) == pytest.approx(-0.4)
    assert invocation_reward(2.0, 1.0, cfg=cfg) == pytest.approx(-1.0 - 4.0 * 0.5)


@pytest.mark.parametrize("exec_s,base", [(1.0, math.nan), (math.nan, 1.0)])
def test_nan_inputs_never_earn_the_best_reward(exec_s: float, base: float) -> None:
    try:
        r = invocation_reward(exec_s, base, failed=True)
    except ValueError:
        return
    assert r < 0


# ------------------------------------------------------------------- efficiency and scarcity
@given(base=st.floats(1e-2, 1e4), cpu=st.floats(0.05, 8.0), mem=st.floats(0.05, 8.0))
def test_efficiency_is_zero_at_the_users_size_a_bonus_below_and_a_cost_above(
    base: float, cpu: float, mem: float
) -> None:
    assert invocation_reward(base, base, cpu_held=1.0, mem_held=1.0) == pytest.approx(0.0)
    r = invocation_reward(base, base, cpu_held=cpu, mem_held=mem)
    expect = -CFG.efficiency_weight * 0.5 * ((cpu - 1.0) + (mem - 1.0))
    assert r == pytest.approx(min(1.0, expect), abs=1e-12)
    if cpu <= 1.0 and mem <= 1.0:
        assert r >= 0.0  # holding less than the user's size is never charged
    if cpu >= 1.0 and mem >= 1.0:
        assert r <= 0.0


def test_efficiency_examples_and_its_weight() -> None:
    # half of both resources at the same speed: as good as running 10% faster
    assert invocation_reward(1.0, 1.0, cpu_held=0.5, mem_held=0.5) == pytest.approx(0.1)
    assert invocation_reward(0.9, 1.0) == pytest.approx(0.1)
    # twice the cores for no speed-up
    assert invocation_reward(1.0, 1.0, cpu_held=2.0) == pytest.approx(-0.1)
    off = RewardConfig(efficiency_weight=0.0)
    assert invocation_reward(1.0, 1.0, cfg=off, cpu_held=0.1, mem_held=0.1) == 0.0


def test_a_failed_run_earns_no_efficiency_bonus() -> None:
    # a run killed early held little; its work is done again, so the failure is its whole cost
    killed = invocation_reward(0.1, 1.0, failed=True, cpu_held=0.05, mem_held=0.05)
    assert killed == pytest.approx((1.0 - 0.1) - CFG.failure_penalty)


@given(base=st.floats(1e-2, 100.0), caused=st.floats(-100.0, 100.0))
def test_caused_queueing_is_charged_like_own_waiting_and_credited_when_negative(
    base: float, caused: float
) -> None:
    r = invocation_reward(base, base, caused_queue_s=caused)
    own = invocation_reward(base, base, queue_s=caused) if caused >= 0 else None
    expect = -CFG.delay_weight * caused / max(base, CFG.delay_floor_s)
    assert r == pytest.approx(max(-CFG.clip, min(1.0, expect)), abs=1e-9)
    if own is not None:
        assert r == pytest.approx(own)
    if caused < 0:
        assert r > 0.0


def test_held_ratio() -> None:
    assert held_ratio(4.0, 2.0, 2.0) == 1.0  # the user's 2 cores for its 2 s baseline
    assert held_ratio(1.0, 2.0, 2.0) == 0.25
    assert held_ratio(3.0, 0.0, 2.0) == 1.0  # unknown reference: neutral
