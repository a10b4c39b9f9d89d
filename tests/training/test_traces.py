"""Tests for training.traces: Azure 2019 loading (both layouts), writing, generator, arrivals."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.traces import (
    DURATION_PCTS,
    MEMORY_PCTS,
    Trace,
    TraceFunction,
    generate,
    load_azure,
    sample_trace,
    write_azure,
)

SAMPLE_DIR = Path(__file__).parents[2] / "training" / "data" / "azure2019-sample"


def _write(path: Path, rows: list[list]) -> None:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def _assert_same(a: Trace, b: Trace) -> None:
    assert a.minutes == b.minutes and len(a.functions) == len(b.functions)
    for f, g in zip(a.functions, b.functions):
        assert (f.name, f.trigger) == (g.name, g.trigger)
        np.testing.assert_array_equal(f.per_minute, g.per_minute)
        np.testing.assert_array_equal(f.duration_pct_ms, g.duration_pct_ms)
        np.testing.assert_array_equal(f.memory_pct_mb, g.memory_pct_mb)
        assert f.duration_avg_ms == g.duration_avg_ms
        assert f.memory_avg_mb == g.memory_avg_mb or (
            np.isnan(f.memory_avg_mb) and np.isnan(g.memory_avg_mb)
        )


def test_sample_loads_and_matches_csv_sums():
    t = sample_trace()
    assert len(t.functions) == 10 and t.minutes == 60
    with (SAMPLE_DIR / "invocation.csv").open() as fh:
        rows = list(csv.reader(fh))[1:]
    assert t.total_invocations() == sum(int(v) for r in rows for v in r[2:])
    by_name = {f.name: f for f in t.functions}
    assert by_name["ir"].per_minute.sum() == 22 and by_name["ir"].trigger == "http"
    np.testing.assert_array_equal(
        by_name["dh"].duration_pct_ms, [3900, 4462, 15385, 41538, 70266, 300100, 300152]
    )
    assert by_name["dh"].memory_avg_mb == 185.0 and by_name["dh"].memory_pct_mb[-1] == 388.0
    assert all(f.per_minute.dtype == np.int64 for f in t.functions)


def test_real_layout_joins_memory_per_app_and_drops_missing_durations(tmp_path):
    minutes = [str(m) for m in range(1, 1441)]
    counts = {"f1": [1] * 1440, "f2": [0, 2] * 720, "f3": [3] * 1440, "f4": [1] + [0] * 1439}
    apps = {"f1": "a1", "f2": "a1", "f3": "a2", "f4": "a3"}
    _write(
        tmp_path / "invocations_per_function_md.anon.d02.csv",
        [["HashOwner", "HashApp", "HashFunction", "Trigger", *minutes]]
        + [["o", apps[f], f, "http", *c] for f, c in counts.items()],
    )
    dur_cols = [f"percentile_Average_{p}" for p in DURATION_PCTS]
    _write(
        tmp_path / "function_durations_percentiles.anon.d02.csv",
        [
            [
                "HashOwner",
                "HashApp",
                "HashFunction",
                "Average",
                "Count",
                "Minimum",
                "Maximum",
                *dur_cols,
            ]
        ]
        + [
            ["o", apps[f], f, 10 * i, 5, 1, 99, *(np.arange(7) * i)]
            for i, f in enumerate(["f1", "f2", "f4"], start=1)
        ],
    )  # f3 has no durations
    mem_cols = [f"AverageAllocatedMb_pct{p}" for p in MEMORY_PCTS]
    _write(
        tmp_path / "app_memory_percentiles.anon.d02.csv",
        [
            ["HashOwner", "HashApp", "SampleCount", "AverageAllocatedMb", *mem_cols],
            ["o", "a1", 7, 128, *range(100, 108)],
            ["o", "a2", 7, 256, *range(200, 208)],
        ],
    )  # a3 has no memory row

    with pytest.raises(FileNotFoundError, match="d01"):
        load_azure(tmp_path)  # default day 1 does not exist
    t = load_azure(tmp_path, day=2)
    assert t.minutes == 1440 and [f.name for f in t.functions] == ["f1", "f2", "f4"]
    f1, f2, f4 = t.functions
    assert f1.memory_avg_mb == f2.memory_avg_mb == 128.0  # same app, same memory row
    np.testing.assert_array_equal(f2.memory_pct_mb, np.arange(100, 108))
    np.testing.assert_array_equal(f2.duration_pct_ms, np.arange(7) * 2)
    assert f2.duration_avg_ms == 20.0 and f2.per_minute.sum() == 1440
    assert np.isnan(f4.memory_avg_mb) and np.isnan(f4.memory_pct_mb).all()


def test_write_load_round_trip(tmp_path):
    t = generate(50, 30, seed=3)
    # one function with unknown memory must survive the round trip as NaN
    f0 = t.functions[0]
    funcs = [
        TraceFunction(
            f0.name,
            f0.trigger,
            f0.per_minute,
            f0.duration_avg_ms,
            f0.duration_pct_ms,
            np.nan,
            np.full(8, np.nan),
        ),
        *t.functions[1:],
    ]
    t = Trace(funcs, t.minutes)
    write_azure(t, tmp_path / "out")
    _assert_same(t, load_azure(tmp_path / "out"))
    _assert_same(sample_trace(), load_azure(_rewrite(sample_trace(), tmp_path / "s")))


def _rewrite(t: Trace, path: Path) -> Path:
    write_azure(t, path)
    return path


def test_generator_is_deterministic_and_seed_dependent():
    a, b, c = generate(200, 60, 7), generate(200, 60, 7), generate(200, 60, 8)
    _assert_same(a, b)
    assert any(
        not np.array_equal(f.per_minute, g.per_minute) for f, g in zip(a.functions, c.functions)
    )


def test_generator_shapes():
    t = generate(1000, 60, seed=0)
    totals = np.sort([f.per_minute.sum() for f in t.functions])[::-1]
    assert totals[:100].sum() > 0.5 * totals.sum()  # heavy-tailed popularity
    assert (totals <= 10).sum() > 100  # many sparse functions
    assert 2e4 < totals.sum() < 5e5  # ~1e5 at the natural scale
    triggers = [f.trigger for f in t.functions]
    assert 0.2 < triggers.count("http") / 1000 < 0.45
    assert 0.2 < triggers.count("timer") / 1000 < 0.45
    periodic = 0
    for f in t.functions:
        assert np.all(np.diff(f.duration_pct_ms) >= 0) and np.all(np.diff(f.memory_pct_mb) >= 0)
        nz = np.flatnonzero(f.per_minute)
        if f.trigger == "timer" and nz.size >= 3:
            periodic += len(set(np.diff(nz))) == 1 and len(set(f.per_minute[nz])) == 1
    assert periodic > 100
    medians = np.array([f.duration_pct_ms[3] for f in t.functions])
    assert medians.max() / medians.min() > 100
    mem = np.array([f.memory_pct_mb[3] for f in t.functions])
    assert 100 < np.median(mem) < 220 and np.mean((mem >= 64) & (mem <= 512)) > 0.8


def test_mean_rate_rescales():
    t = generate(500, 120, seed=1, mean_rate_per_min=200.0)
    assert 120 < t.total_invocations() / 120 < 300


def test_generated_large_trace_loads_after_write(tmp_path):
    t = generate(1000, 60, seed=11)
    write_azure(t, tmp_path)
    back = load_azure(tmp_path)
    assert len(back.functions) == 1000 and back.total_invocations() == t.total_invocations()


def test_arrivals_sorted_counted_and_in_their_minutes():
    t = generate(300, 30, seed=5)
    times, fn = t.arrivals(seed=0)
    assert times.dtype == np.float64 and fn.dtype == np.int32
    assert times.size == t.total_invocations() and np.all(np.diff(times) >= 0)
    minute = (times // 60).astype(int)
    for i, f in enumerate(t.functions):
        np.testing.assert_array_equal(np.bincount(minute[fn == i], minlength=30), f.per_minute)
    np.testing.assert_array_equal(t.arrivals(seed=0)[0], times)
    # a timer firing c times in a minute is evenly spaced 60/c seconds apart
    i = next(
        i for i, f in enumerate(t.functions) if f.trigger == "timer" and f.per_minute.max() > 1
    )
    first = times[(fn == i) & (minute == int(np.argmax(t.functions[i].per_minute)))]
    np.testing.assert_allclose(np.diff(first), 60.0 / first.size)


def test_timer_phases_are_spread_over_the_minute_for_the_traces_own_seed():
    # A preset generates its trace and places its arrivals from one seed: the phases must not
    # be the draws that chose which functions are timers (then every timer fired in the first
    # third of its minute, together).
    t = generate(300, 30, seed=5)
    times, fn = t.arrivals(seed=5)
    timer = np.array([f.trigger == "timer" for f in t.functions])
    minute = (times // 60).astype(int)
    count = np.array([t.functions[f].per_minute[m] for f, m in zip(fn, minute)])
    # firing r of c in a minute is at (phase + r) / c of it: the phase is what is left over
    phase = (times % 60.0) / 60.0 * count % 1.0
    phases = np.array([phase[fn == i][0] for i in np.flatnonzero(timer) if (fn == i).any()])
    assert len(phases) > 50
    assert 0.35 < phases.mean() < 0.65 and phases.max() > 0.8


def test_arrivals_fast_for_a_million_invocations():
    t = generate(1000, 60, seed=2, mean_rate_per_min=1e6 / 60)
    start = time.perf_counter()
    times, _ = t.arrivals(seed=1)
    assert times.size > 8e5 and time.perf_counter() - start < 1.0


def test_slice_and_subset():
    t = sample_trace()
    s = t.slice(10, 20)
    assert s.minutes == 20
    np.testing.assert_array_equal(s.functions[0].per_minute, t.functions[0].per_minute[10:30])
    assert [f.name for f in t.subset([3, 1]).functions] == ["vp", "eg"]
    with pytest.raises(ValueError):
        t.slice(50, 20)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: [r[:1] + r[2:] for r in rows], "Trigger"),  # missing column
        (lambda rows: rows[:2] + [rows[2][:5] + ["x"] + rows[2][6:]] + rows[3:], "non-numeric"),
    ],
)
def test_malformed_invocation_file_names_file(tmp_path, mutate, message):
    for name in ("duration.csv", "memory.csv"):
        (tmp_path / name).write_text((SAMPLE_DIR / name).read_text())
    with (SAMPLE_DIR / "invocation.csv").open() as fh:
        _write(tmp_path / "invocation.csv", mutate(list(csv.reader(fh))))
    with pytest.raises(ValueError, match=f"invocation.csv.*{message}"):
        load_azure(tmp_path)


def test_malformed_duration_file_names_file(tmp_path):
    for name in ("invocation.csv", "memory.csv"):
        (tmp_path / name).write_text((SAMPLE_DIR / name).read_text())
    text = (SAMPLE_DIR / "duration.csv").read_text().replace("percentile_Average_99,", "p99,")
    (tmp_path / "duration.csv").write_text(text)
    with pytest.raises(ValueError, match="duration.csv.*percentile_Average_99"):
        load_azure(tmp_path)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 8), minutes=st.integers(1, 10))
def test_property_durations_within_curve_and_arrival_counts(seed, n, minutes):
    t = generate(n, minutes, seed)
    rng = np.random.default_rng(seed)
    for i, f in enumerate(t.functions):
        d = t.sample_duration_ms(i, rng, 200)
        assert d.shape == (200,)
        assert d.min() >= f.duration_pct_ms[0] and d.max() <= f.duration_pct_ms[-1]
    times, fn = t.arrivals(seed)
    assert times.size == fn.size == t.total_invocations()
    assert times.size == 0 or (times.min() >= 0 and times.max() < 60 * minutes)


def test_generated_durations_are_finite_and_bounded_for_many_seeds():
    from training.traces import MAX_DURATION_MS

    for seed in range(40):
        trace = generate(200, 2, seed)
        for f in trace.functions:
            assert (
                np.all(np.isfinite(f.duration_pct_ms)) and f.duration_pct_ms[-1] <= MAX_DURATION_MS
            )
            assert np.isfinite(f.duration_avg_ms)
