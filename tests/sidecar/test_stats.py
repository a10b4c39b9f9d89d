"""Incremental per-function statistics."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.stats import EWMA_ALPHA, FunctionStats


def test_fresh_stats_are_unknown() -> None:
    s = FunctionStats()
    assert s.arrivals == 0 and s.completions == 0
    assert math.isnan(s.mean_iat_s) and math.isnan(s.baseline_duration_s)
    assert math.isnan(s.last_safeguard_s)
    assert s.rate_per_s() == 0.0
    s.on_arrival(12.0)
    assert s.arrivals == 1 and s.last_arrival_s == 12.0
    assert math.isnan(s.mean_iat_s)  # one arrival says nothing about the inter-arrival time
    assert s.rate_per_s() == 0.0


@given(
    period=st.floats(1e-3, 1e4),
    start=st.floats(0, 1e6),
    n=st.integers(2, 300),
)
def test_mean_iat_of_regular_arrivals_is_the_period(period: float, start: float, n: int) -> None:
    s = FunctionStats()
    for i in range(n):
        s.on_arrival(start + i * period)
    assert s.arrivals == n
    assert s.mean_iat_s == pytest.approx(period, rel=1e-6, abs=1e-9)
    assert s.rate_per_s() == pytest.approx(1.0 / period, rel=1e-6)


def test_first_inter_arrivals_use_a_plain_mean() -> None:
    s = FunctionStats()
    for t in (0.0, 1.0, 3.0, 6.0):  # gaps 1, 2, 3
        s.on_arrival(t)
    assert s.mean_iat_s == pytest.approx(2.0)


def test_ewma_follows_a_step_change() -> None:
    s = FunctionStats()
    t = 0.0
    for _ in range(50):
        s.on_arrival(t)
        t += 1.0
    assert s.mean_iat_s == pytest.approx(1.0)
    prev = s.mean_iat_s
    s.on_arrival(t - 1.0 + 5.0)  # one gap of 5 s: moves by alpha of the difference
    t += 4.0
    assert s.mean_iat_s == pytest.approx(prev + EWMA_ALPHA * (5.0 - prev))
    means = [s.mean_iat_s]
    for _ in range(60):
        t += 5.0
        s.on_arrival(t)
        means.append(s.mean_iat_s)
    assert all(b >= a for a, b in zip(means, means[1:]))  # monotone toward the new level
    assert s.mean_iat_s == pytest.approx(5.0, rel=1e-3)
    assert s.rate_per_s() == pytest.approx(0.2, rel=1e-3)
    # and it does not take forever: ~10 invocations bring most of the change
    s2 = FunctionStats()
    for i in range(30):
        s2.on_arrival(float(i))
    for k in range(1, 11):
        s2.on_arrival(29.0 + 10.0 * k)
    assert s2.mean_iat_s > 1.0 + 0.85 * 9.0


def test_completion_means_follow_a_step_change() -> None:
    s = FunctionStats()
    for i in range(40):
        s.on_completion(float(i), 1.0, 0.5, 100.0, at_user_size=False)
    assert s.mean_duration_s == pytest.approx(1.0)
    assert s.mean_cpu_peak_cores == pytest.approx(0.5)
    assert s.mean_mem_peak_mb == pytest.approx(100.0)
    for i in range(40):
        s.on_completion(40.0 + i, 3.0, 2.0, 300.0, at_user_size=False)
    assert s.mean_duration_s == pytest.approx(3.0, rel=1e-3)
    assert s.mean_cpu_peak_cores == pytest.approx(2.0, rel=1e-3)
    assert s.mean_mem_peak_mb == pytest.approx(300.0, rel=1e-3)
    assert (s.last_cpu_peak_cores, s.last_mem_peak_mb) == (2.0, 300.0)
    assert s.completions == 80


def test_early_completion_means_are_unbiased() -> None:
    s = FunctionStats()
    s.on_completion(1.0, 2.0, 1.0, 50.0, at_user_size=False)
    assert s.mean_duration_s == 2.0 and s.mean_cpu_peak_cores == 1.0  # not pulled toward 0
    s.on_completion(2.0, 4.0, 3.0, 150.0, at_user_size=False)
    assert s.mean_duration_s == pytest.approx(3.0)
    assert s.mean_mem_peak_mb == pytest.approx(100.0)


def test_baseline_is_set_only_by_user_size_runs() -> None:
    s = FunctionStats()
    s.on_completion(1.0, 0.5, 1.0, 10.0, at_user_size=False)
    s.on_completion(2.0, 0.7, 1.0, 10.0, at_user_size=False)
    assert math.isnan(s.baseline_duration_s) and s.baseline_runs == 0
    assert math.isnan(s.last_safeguard_s)
    s.on_completion(3.0, 2.0, 1.0, 10.0, at_user_size=True)
    assert s.baseline_duration_s == 2.0 and s.baseline_runs == 1 and s.last_safeguard_s == 3.0
    s.on_completion(4.0, 100.0, 1.0, 10.0, at_user_size=False)
    assert s.baseline_duration_s == 2.0 and s.baseline_runs == 1 and s.last_safeguard_s == 3.0
    s.on_completion(5.0, 4.0, 1.0, 10.0, at_user_size=True)
    assert s.baseline_duration_s == pytest.approx(3.0)  # plain mean of the first two
    assert s.baseline_runs == 2 and s.last_safeguard_s == 5.0
    for i in range(60):
        s.on_completion(6.0 + i, 10.0, 1.0, 10.0, at_user_size=True)
    assert s.baseline_duration_s == pytest.approx(10.0, rel=1e-3)


def test_out_of_order_arrival_counts_as_zero_gap() -> None:
    s = FunctionStats()
    s.on_arrival(10.0)
    s.on_arrival(9.0)
    assert s.mean_iat_s == 0.0
    assert s.rate_per_s() == 0.0  # a zero mean gives no rate rather than infinity


def test_rate_per_s() -> None:
    s = FunctionStats(mean_iat_s=0.25)
    assert s.rate_per_s() == 4.0
    assert FunctionStats(mean_iat_s=-1.0).rate_per_s() == 0.0
    assert FunctionStats(mean_iat_s=math.nan).rate_per_s() == 0.0


@given(
    st.lists(
        st.tuples(
            st.floats(0, 100), st.floats(0, 50), st.floats(0, 8), st.floats(0, 4096), st.booleans()
        ),
        max_size=200,
    )
)
def test_state_is_constant_size_and_means_are_bounded(events) -> None:
    """O(1) state: a fixed set of scalar fields however long the history; means stay in range."""
    s = FunctionStats()
    t = 0.0
    durs, cpus = [], []
    for gap, dur, cpu, mem, user in events:
        t += gap
        s.on_arrival(t)
        s.on_completion(t + dur, dur, cpu, mem, at_user_size=user)
        durs.append(dur)
        cpus.append(cpu)
    fields = dataclasses.asdict(s)
    assert set(fields) == {f.name for f in dataclasses.fields(FunctionStats)}
    assert all(isinstance(v, (int, float)) for v in fields.values())
    assert s.arrivals == s.completions == len(events)
    if events:
        assert min(durs) - 1e-9 <= s.mean_duration_s <= max(durs) + 1e-9
        assert min(cpus) - 1e-9 <= s.mean_cpu_peak_cores <= max(cpus) + 1e-9
        assert s.baseline_runs == sum(e[4] and e[1] > 0 for e in events)  # zero-length: none
        assert math.isnan(s.baseline_duration_s) == (s.baseline_runs == 0)


def test_input_history_is_a_geometric_mean_and_inputs_compare_to_it() -> None:
    s = FunctionStats()
    assert math.isnan(s.input_vs_history(100.0))  # no history yet
    for x in (10.0, 1000.0):
        s.on_completion(1.0, 0.5, 0.1, 10.0, at_user_size=False, input_size=x)
    assert s.inputs == 2 and math.exp(s.mean_log_input) == pytest.approx(100.0)
    assert s.input_vs_history(100.0) == pytest.approx(0.0, abs=1e-12)
    assert s.input_vs_history(400.0) == pytest.approx(2.0)  # log2 of 4x
    assert math.isnan(s.input_vs_history(None)) and math.isnan(s.input_vs_history(0.0))
    # no input reported, or a non-positive one: the history is unchanged
    s.on_completion(2.0, 0.5, 0.1, 10.0, at_user_size=False)
    s.on_completion(3.0, 0.5, 0.1, 10.0, at_user_size=False, input_size=-1.0)
    assert s.inputs == 2 and s.completions == 4
    # then it follows a step change like every other mean (EWMA)
    for _ in range(60):
        s.on_completion(4.0, 0.5, 0.1, 10.0, at_user_size=False, input_size=5.0)
    assert math.exp(s.mean_log_input) == pytest.approx(5.0, rel=1e-3)
