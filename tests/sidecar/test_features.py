"""The feature encoding: shapes, finiteness, documented columns and the schema stamp."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core import features as F
from sidecar.core.features import (
    CANDIDATE_FEATURES,
    CONTEXT_FEATURES,
    FEATURES,
    N_CONTEXT,
    N_FEATURES,
    Feature,
    FeatureEncoder,
    NodeState,
    schema,
    schema_hash,
)
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.safeguard import SafeguardState
from sidecar.core.stats import FunctionStats

C = N_CONTEXT
COL = {f.name: i for i, f in enumerate(FEATURES)}

G = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
NODE = NodeState(
    total_cores=2.0, total_mem_mb=4096.0, free_cores=1.0, free_mem_mb=1024.0, pending=3
)
USER = Alloc(4, 2)  # 1 core, 128 MB


def _populated() -> tuple[FunctionStats, SafeguardState]:
    s = FunctionStats()
    for i in range(10):
        s.on_arrival(2.0 * i)
        s.on_completion(2.0 * i + 0.5, 0.5 + 0.01 * i, 0.6, 90.0, at_user_size=(i % 3 == 0))
    gs = SafeguardState(
        calibrate=None,
        last_alloc=Alloc(3, 2),
        last_cpu_peak_cores=0.6,
        last_mem_peak_mb=90.0,
        recent_cpu_peak_cores=0.7,
        recent_mem_peak_mb=95.0,
    )
    return s, gs


def _encode(
    enc: FeatureEncoder,
    node: NodeState,
    stats: FunctionStats,
    gs: SafeguardState,
    user: Alloc,
    now: float,
) -> tuple[np.ndarray, np.ndarray]:
    ctx = enc.context(node, stats, gs, user, now)
    return ctx, enc.rows(ctx, gs, user)


@pytest.mark.parametrize("populated", [False, True])
def test_shapes_dtype_and_finiteness(populated: bool) -> None:
    enc = FeatureEncoder(G)
    stats, gs = _populated() if populated else (FunctionStats(), SafeguardState())
    ctx, rows = _encode(enc, NODE, stats, gs, USER, 30.0)
    assert ctx.shape == (N_CONTEXT,) and ctx.dtype == np.float32
    assert rows.shape == (G.n, N_FEATURES) and rows.dtype == np.float32
    assert np.isfinite(ctx).all() and np.isfinite(rows).all()
    np.testing.assert_array_equal(rows[:, :N_CONTEXT], np.broadcast_to(ctx, (G.n, N_CONTEXT)))


def test_fresh_stats_context_values() -> None:
    enc = FeatureEncoder(G)
    ctx = enc.context(NODE, FunctionStats(), SafeguardState(), USER, 0.0)
    assert ctx[COL["pending"]] == pytest.approx(math.log1p(3) / 5)
    assert ctx[COL["free_cpu"]] == pytest.approx(0.5)
    assert ctx[COL["free_mem"]] == pytest.approx(0.25)
    assert ctx[COL["inter_arrival"]] == 1.0  # unknown
    assert ctx[COL["rate"]] == 0.0
    assert ctx[COL["since_safeguard"]] == 1.0  # never
    assert ctx[COL["history"]] == 0.0
    assert ctx[COL["slowdown"]] == 0.0  # no baseline yet
    assert ctx[COL["user_cpu"]] == pytest.approx(4 / 8)
    assert ctx[COL["user_mem"]] == pytest.approx(2 / 8)
    # unknown baseline falls back to the mean duration
    assert ctx[COL["baseline_duration"]] == ctx[COL["mean_duration"]]


def test_populated_context_values() -> None:
    enc = FeatureEncoder(G)
    stats, gs = _populated()
    ctx = enc.context(NODE, stats, gs, USER, 30.0)
    assert ctx[COL["inter_arrival"]] == pytest.approx(math.log10(2.0 + 1e-3) / 4, rel=1e-5)
    assert ctx[COL["rate"]] == pytest.approx(math.log1p(0.5), rel=1e-5)
    assert ctx[COL["mean_cpu_peak"]] == pytest.approx(0.6 / 1.0, rel=1e-5)
    assert ctx[COL["mean_mem_peak"]] == pytest.approx(90.0 / 128.0, rel=1e-5)
    assert ctx[COL["recent_cpu_peak"]] == pytest.approx(0.7, rel=1e-5)
    assert ctx[COL["recent_mem_peak"]] == pytest.approx(95.0 / 128.0, rel=1e-5)
    assert ctx[COL["since_safeguard"]] == pytest.approx(math.log1p(30.0 - 18.5) / 10, rel=1e-5)
    assert ctx[COL["history"]] == pytest.approx(10 / 20)
    want = min(3.0, max(-1.0, stats.mean_duration_s / stats.baseline_duration_s - 1.0))
    assert ctx[COL["slowdown"]] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert ctx[COL["baseline_duration"]] == pytest.approx(
        math.log10(stats.baseline_duration_s + 1e-3) / 3, rel=1e-5
    )
    # history saturates at 20 completions, free ratios clip to [-1, 1]
    for i in range(30):
        stats.on_completion(40.0 + i, 0.5, 0.5, 90.0, at_user_size=False)
    over = NodeState(total_cores=2.0, total_mem_mb=100.0, free_cores=-10.0, free_mem_mb=500.0)
    ctx = enc.context(over, stats, gs, USER, 80.0)
    assert ctx[COL["history"]] == 1.0
    assert ctx[COL["free_cpu"]] == -1.0 and ctx[COL["free_mem"]] == 1.0


def test_candidate_columns_vary_as_documented() -> None:
    enc = FeatureEncoder(G)
    stats, gs = _populated()
    ctx, rows = _encode(enc, NODE, stats, gs, USER, 30.0)
    cpu, mem = G.cand_cpu, G.cand_mem
    u = G.index(USER)
    np.testing.assert_allclose(rows[:, COL["cand_cpu"]], cpu / G.cpu_units, rtol=1e-6)
    np.testing.assert_allclose(rows[:, COL["cand_mem"]], mem / G.mem_units, rtol=1e-6)
    cvu, mvu = rows[:, COL["cand_cpu_vs_user"]], rows[:, COL["cand_mem_vs_user"]]
    np.testing.assert_allclose(cvu, np.log2(cpu / USER.cpu), atol=1e-6)
    np.testing.assert_allclose(mvu, np.log2(mem / USER.mem), atol=1e-6)
    assert cvu[u] == 0.0 and mvu[u] == 0.0
    assert (cvu[cpu > USER.cpu] > 0).all() and (cvu[cpu < USER.cpu] < 0).all()
    assert (mvu[mem > USER.mem] > 0).all() and (mvu[mem < USER.mem] < 0).all()
    # exactly the candidates with the user's cpu (mem) have a zero cpu (mem) ratio
    np.testing.assert_array_equal(cvu == 0.0, cpu == USER.cpu)
    np.testing.assert_array_equal(mvu == 0.0, mem == USER.mem)
    np.testing.assert_allclose(
        rows[:, COL["cand_cpu_vs_peak"]], np.log2(cpu * 0.25 / (0.7 + 0.05)) / 4, rtol=1e-5
    )
    np.testing.assert_allclose(
        rows[:, COL["cand_mem_vs_peak"]], np.log2(mem * 64.0 / (95.0 + 1.0)) / 4, rtol=1e-5
    )
    # each candidate column depends on its own resource only
    for name in ("cand_cpu", "cand_cpu_vs_user", "cand_cpu_vs_peak"):
        col = rows[:, COL[name]].reshape(G.cpu_units, G.mem_units)
        assert (col == col[:, :1]).all(), name
    for name in ("cand_mem", "cand_mem_vs_user", "cand_mem_vs_peak"):
        col = rows[:, COL[name]].reshape(G.cpu_units, G.mem_units)
        assert (col == col[:1, :]).all(), name
    # a different peak or user size moves the candidate columns
    gs2 = SafeguardState(recent_cpu_peak_cores=1.5, recent_mem_peak_mb=10.0)
    _, rows2 = _encode(enc, NODE, stats, gs2, USER, 30.0)
    assert (rows2[:, COL["cand_cpu_vs_peak"]] < rows[:, COL["cand_cpu_vs_peak"]]).all()
    assert (rows2[:, COL["cand_mem_vs_peak"]] > rows[:, COL["cand_mem_vs_peak"]]).all()
    _, rows3 = _encode(enc, NODE, stats, gs, Alloc(2, 2), 30.0)
    assert rows3[G.index(Alloc(2, 2)), COL["cand_cpu_vs_user"]] == 0.0
    assert rows3[u, COL["cand_cpu_vs_user"]] == pytest.approx(1.0)


def test_rows_do_not_share_state_between_calls() -> None:
    enc = FeatureEncoder(G)
    stats, gs = _populated()
    ctx1, rows1 = _encode(enc, NODE, stats, gs, USER, 30.0)
    keep = rows1.copy()
    _, rows2 = _encode(enc, NODE, FunctionStats(), SafeguardState(), Alloc(8, 8), 1.0)
    np.testing.assert_array_equal(rows1, keep)
    assert not np.array_equal(rows1, rows2)
    rows2[:] = 99.0
    _, rows3 = _encode(enc, NODE, stats, gs, USER, 30.0)
    np.testing.assert_array_equal(rows3, keep)


def test_blocks_are_cached_read_only_and_expand_to_rows() -> None:
    enc = FeatureEncoder(G)
    stats, gs = _populated()
    cpu, mem = enc.blocks(gs, USER)
    assert cpu.shape == (G.cpu_units, F.N_BLOCK) and mem.shape == (G.mem_units, F.N_BLOCK)
    assert 2 * F.N_BLOCK == N_FEATURES - N_CONTEXT
    assert not cpu.flags.writeable and not mem.flags.writeable
    with pytest.raises(ValueError):
        cpu[0, 0] = 5.0
    again = enc.blocks(gs, USER)
    assert again[0] is cpu and again[1] is mem
    ctx, rows = _encode(enc, NODE, stats, gs, USER, 30.0)
    np.testing.assert_array_equal(F.expand_rows(ctx, cpu, mem), rows)
    assert rows.flags.writeable  # the rows are a fresh array, not a cached one
    # batches: leading dimensions broadcast through
    gs2 = SafeguardState(recent_cpu_peak_cores=1.5, recent_mem_peak_mb=10.0)
    ctx2, rows2 = _encode(enc, NODE, FunctionStats(), gs2, Alloc(8, 8), 3.0)
    b2 = enc.blocks(gs2, Alloc(8, 8))
    batch = F.expand_rows(np.stack([ctx, ctx2]), np.stack([cpu, b2[0]]), np.stack([mem, b2[1]]))
    assert batch.shape == (2, G.n, N_FEATURES)
    np.testing.assert_array_equal(batch[0], rows)
    np.testing.assert_array_equal(batch[1], rows2)


def test_schema_lists_every_feature() -> None:
    s = schema()
    assert s["version"] == F.FEATURE_VERSION
    assert len(s["context"]) == N_CONTEXT == len(CONTEXT_FEATURES)
    assert (
        len(s["context"]) + len(s["candidate"]) == N_FEATURES == len(CANDIDATE_FEATURES) + N_CONTEXT
    )
    names = [f["name"] for f in s["context"] + s["candidate"]]
    assert names == [f.name for f in FEATURES]
    assert len(set(names)) == N_FEATURES
    assert all(set(f) == {"name", "unit", "scaling"} for f in s["context"] + s["candidate"])


def test_schema_hash_is_stable() -> None:
    h = schema_hash()
    assert h == schema_hash() == schema_hash()
    assert len(h) == 16 and int(h, 16) >= 0


def test_schema_hash_changes_with_any_feature(monkeypatch: pytest.MonkeyPatch) -> None:
    h = schema_hash()
    ctx = list(CONTEXT_FEATURES)
    ctx[3] = Feature(ctx[3].name, ctx[3].unit, ctx[3].scaling + " (changed)")
    monkeypatch.setattr(F, "CONTEXT_FEATURES", tuple(ctx))
    h1 = schema_hash()
    assert h1 != h
    monkeypatch.undo()
    assert schema_hash() == h
    cand = list(CANDIDATE_FEATURES)
    cand[0], cand[1] = cand[1], cand[0]  # a reordering changes the interface too
    monkeypatch.setattr(F, "CANDIDATE_FEATURES", tuple(cand))
    assert schema_hash() not in (h, h1)
    monkeypatch.undo()
    monkeypatch.setattr(F, "FEATURE_VERSION", F.FEATURE_VERSION + 1)
    assert schema_hash() != h


def test_editing_a_returned_schema_does_not_change_the_features() -> None:
    h = schema_hash()
    name = CONTEXT_FEATURES[0].name
    s = schema()
    try:
        s["context"][0]["name"] = "edited"
        assert CONTEXT_FEATURES[0].name == name
        assert schema_hash() == h
    finally:
        object.__setattr__(CONTEXT_FEATURES[0], "name", name)  # repair the module for other tests


# --- any plausible input encodes to finite numbers -----------------------------------------

CPU_UNITS = (0.1, 0.25, 0.5, 1.0, 2.0)
MEM_UNITS = (8.0, 16.0, 64.0, 128.0)


@st.composite
def scenes(draw):
    g = ResourceGrid(
        cpu_unit_cores=draw(st.sampled_from(CPU_UNITS)),
        cpu_units=draw(st.integers(1, 12)),
        mem_unit_mb=draw(st.sampled_from(MEM_UNITS)),
        mem_units=draw(st.integers(1, 12)),
    )
    user = Alloc(draw(st.integers(1, g.cpu_units)), draw(st.integers(1, g.mem_units)))
    total_c = draw(st.floats(0.1, 256))
    total_m = draw(st.floats(64, 1e6))
    node = NodeState(
        total_cores=total_c,
        total_mem_mb=total_m,
        free_cores=draw(st.floats(-total_c, total_c)),
        free_mem_mb=draw(st.floats(-total_m, total_m)),
        pending=draw(st.integers(0, 10_000)),
    )
    stats = FunctionStats()
    t = draw(st.floats(0, 1e7))
    for gap, dur, cpu, mem, at_user in draw(
        st.lists(
            st.tuples(
                st.floats(0, 1e4),
                st.floats(0, 1e3),
                st.floats(0, 64),
                st.floats(0, 1e5),
                st.booleans(),
            ),
            max_size=25,
        )
    ):
        t += gap
        stats.on_arrival(t)
        if draw(st.booleans()):
            stats.on_completion(t + dur, dur, cpu, mem, at_user_size=at_user)
            t += dur
    gs = SafeguardState(
        calibrate=None,
        last_alloc=user,
        recent_cpu_peak_cores=draw(st.floats(0, 64)),
        recent_mem_peak_mb=draw(st.floats(0, 1e5)),
    )
    now = t + draw(st.floats(0, 1e6))
    return g, user, node, stats, gs, now


@settings(max_examples=200, deadline=None)
@given(scenes())
def test_finite_for_any_plausible_input(scene) -> None:
    g, user, node, stats, gs, now = scene
    enc = FeatureEncoder(g)
    ctx = enc.context(node, stats, gs, user, now)
    rows = enc.rows(ctx, gs, user)
    assert rows.shape == (g.n, N_FEATURES) and rows.dtype == np.float32
    assert np.isfinite(ctx).all(), ctx
    assert np.isfinite(rows).all()
    np.testing.assert_array_equal(rows[:, :N_CONTEXT], np.broadcast_to(ctx, (g.n, N_CONTEXT)))
    assert rows[g.index(user), COL["cand_cpu_vs_user"]] == 0.0
    assert rows[g.index(user), COL["cand_mem_vs_user"]] == 0.0
    # bounded columns stay in their documented ranges
    assert -1.0 <= ctx[COL["free_cpu"]] <= 1.0 and -1.0 <= ctx[COL["free_mem"]] <= 1.0
    assert -1.0 <= ctx[COL["slowdown"]] <= 3.0
    assert 0.0 <= ctx[COL["history"]] <= 1.0
    for name in ("cand_cpu", "cand_mem"):
        assert 0.0 < rows[:, COL[name]].min() and rows[:, COL[name]].max() == pytest.approx(1.0)


def test_the_input_columns_compare_the_input_with_the_functions_history() -> None:
    enc = FeatureEncoder(G)
    stats, gs = _populated()
    # no input reported (or no history): unknown, 0 / 0
    ctx = enc.context(NODE, stats, gs, USER, 30.0)
    assert ctx[COL["input_vs_history"]] == 0.0 and ctx[COL["input_known"]] == 0.0
    ctx = enc.context(NODE, stats, gs, USER, 30.0, input_size=50.0)
    assert ctx[COL["input_vs_history"]] == 0.0 and ctx[COL["input_known"]] == 0.0
    for _ in range(3):
        stats.on_completion(31.0, 0.5, 0.6, 90.0, at_user_size=False, input_size=50.0)
    for x, want in ((50.0, 0.0), (200.0, 2.0 / 4), (12.5, -2.0 / 4), (1e6, 1.0), (1e-6, -1.0)):
        ctx = enc.context(NODE, stats, gs, USER, 30.0, input_size=x)
        assert ctx[COL["input_vs_history"]] == pytest.approx(want, abs=1e-6), x
        assert ctx[COL["input_known"]] == 1.0
    # the input changes the context only: the candidate blocks are the same
    rows = enc.rows(ctx, gs, USER)
    np.testing.assert_array_equal(
        rows[:, C:], enc.rows(enc.context(NODE, stats, gs, USER, 30.0), gs, USER)[:, C:]
    )
