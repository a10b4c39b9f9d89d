"""The decision: masked softmax, argmax / sampling, and the pluggable scorers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sidecar.core.features import N_FEATURES, FeatureEncoder, NodeState, expand_rows
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.policy import (
    ONNX_INPUT,
    ONNX_OUTPUT,
    RULES,
    MLPScorer,
    OnnxScorer,
    RuleScorer,
    decide,
    fallback_scorer,
    masked_log_softmax,
    sample_batch,
)
from sidecar.core.safeguard import SafeguardState, guard
from sidecar.core.stats import FunctionStats

# --------------------------------------------------------------------------------------------
# strategies


@st.composite
def scores_and_mask(draw, max_n: int = 64):
    n = draw(st.integers(1, max_n))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    big = float(np.float32(1e30)) if dtype == np.float32 else 1e300
    elems = st.one_of(
        st.floats(-10, 10, width=32),
        st.floats(-big, big, width=32 if dtype == np.float32 else 64),
        st.sampled_from([0.0, 1e-30, -1e-30, 700.0, -745.0, 1e4, -1e4]),
    )
    scores = draw(hnp.arrays(dtype, n, elements=elems))
    mask = draw(hnp.arrays(np.bool_, n))
    mask[draw(st.integers(0, n - 1))] = True
    return scores, mask


def _encoder_rows(g: ResourceGrid, user: Alloc, gs: SafeguardState | None = None) -> np.ndarray:
    enc = FeatureEncoder(g)
    node = NodeState(
        total_cores=g.max_cores,
        total_mem_mb=g.max_mb,
        free_cores=g.max_cores / 2,
        free_mem_mb=g.max_mb / 3,
        pending=1,
    )
    gs = gs or SafeguardState()
    ctx = enc.context(node, FunctionStats(), gs, user, 0.0)
    return enc.rows(ctx, gs, user)


class _FixedRng:
    """A stand-in generator whose random() returns chosen values (for floating-point edges)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


# --------------------------------------------------------------------------------------------
# masked softmax and decide


@settings(max_examples=300, deadline=None)
@given(scores_and_mask())
def test_masked_log_softmax_is_a_distribution_over_allowed(sm) -> None:
    scores, mask = sm
    logp = masked_log_softmax(scores, mask)
    assert logp.shape == scores.shape
    assert np.all(logp[~mask] == -np.inf)
    assert not np.isnan(logp).any()
    assert np.all(logp[mask] <= 1e-12)
    assert math.isclose(float(np.exp(logp[mask]).sum()), 1.0, rel_tol=1e-9)
    # the best allowed candidate has the highest log-probability
    s = scores.astype(np.float64)
    best = np.flatnonzero(mask)[np.argmax(s[mask])]
    assert logp[best] == logp[mask].max()


@given(hnp.arrays(np.float64, st.integers(2, 20), elements=st.floats(-20, 20)), st.data())
def test_masked_log_softmax_matches_softmax_formula(scores, data) -> None:
    mask = data.draw(hnp.arrays(np.bool_, scores.shape))
    mask[0] = True
    logp = masked_log_softmax(scores, mask)
    e = np.exp(scores[mask])
    np.testing.assert_allclose(np.exp(logp[mask]), e / e.sum(), rtol=1e-9)
    # invariant to a constant shift of the scores
    np.testing.assert_allclose(
        masked_log_softmax(scores + 123.0, mask)[mask], logp[mask], atol=1e-9
    )


@settings(max_examples=300, deadline=None)
@given(scores_and_mask(), st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_decide_never_picks_a_masked_out_candidate(sm, seed) -> None:
    scores, mask = sm
    rng = None if seed is None else np.random.default_rng(seed)
    for _ in range(1 if rng is None else 5):
        a, logp = decide(scores, mask, rng)
        assert isinstance(a, int) and 0 <= a < len(scores)
        assert mask[a]
        assert logp <= 1e-12
        ref = masked_log_softmax(scores, mask)[a]
        assert logp == pytest.approx(ref, rel=1e-9, abs=1e-9) or (logp == ref == -np.inf)
        if rng is not None:
            assert logp > -np.inf  # a candidate with zero probability is never sampled


@settings(max_examples=200, deadline=None)
@given(scores_and_mask())
def test_argmax_picks_the_best_allowed(sm) -> None:
    scores, mask = sm
    a, logp = decide(scores, mask)
    s = scores.astype(np.float64)
    assert s[a] == s[mask].max()
    assert a == np.flatnonzero(mask)[np.argmax(s[mask])]  # ties: the first
    assert logp == pytest.approx(float(masked_log_softmax(scores, mask).max()), abs=1e-12)


def test_argmax_ignores_better_masked_out_scores() -> None:
    scores = np.array([5.0, 1.0, 9.0, 2.0, 100.0], dtype=np.float32)
    mask = np.array([False, True, False, True, False])
    a, logp = decide(scores, mask)
    assert a == 3
    assert logp == pytest.approx(2.0 - math.log(math.exp(1.0) + math.exp(2.0)))


def test_sampling_frequencies_match_the_softmax() -> None:
    scores = np.array([0.0, 1.0, 2.0, -1.0, 0.5, 3.0])
    mask = np.array([True, True, False, True, True, False])
    p = np.where(mask, np.exp(scores), 0.0)
    p /= p.sum()
    rng = np.random.default_rng(20240611)
    n = 30_000
    counts = np.zeros(len(scores))
    for _ in range(n):
        a, logp = decide(scores, mask, rng)
        counts[a] += 1
        assert logp == pytest.approx(math.log(p[a]))
    assert counts[~mask].sum() == 0
    exp = n * p[mask]
    chi2 = float(((counts[mask] - exp) ** 2 / exp).sum())
    assert chi2 < 25.0, (counts, exp)  # 3 degrees of freedom: p < 1e-4 when the sampler is right
    np.testing.assert_allclose(counts / n, p, atol=0.01)


def test_sampling_is_reproducible_with_a_seed() -> None:
    scores = np.linspace(-1, 1, 16)
    mask = np.ones(16, dtype=bool)
    a = [decide(scores, mask, np.random.default_rng(7))[0] for _ in range(3)]
    assert a[0] == a[1] == a[2]
    r1, r2 = np.random.default_rng(1), np.random.default_rng(1)
    assert [decide(scores, mask, r1)[0] for _ in range(50)] == [
        decide(scores, mask, r2)[0] for _ in range(50)
    ]


def test_sampling_at_the_ends_of_the_unit_interval() -> None:
    # candidate 0 is masked out, candidate 2 has (numerically) zero probability
    scores = np.array([0.0, 0.0, -1e4, 0.0])
    mask = np.array([False, True, True, False])
    for u in (0.0, 0.5, np.nextafter(1.0, 0.0)):
        a, logp = decide(scores, mask, _FixedRng(u))
        assert a == 1 and logp == pytest.approx(0.0)
    scores = np.array([1.0, 2.0, 3.0])
    mask = np.array([True, True, False])
    assert decide(scores, mask, _FixedRng(0.0))[0] == 0
    assert decide(scores, mask, _FixedRng(np.nextafter(1.0, 0.0)))[0] == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("use_rng", [False, True])
def test_non_finite_allowed_scores_raise(bad: float, use_rng: bool) -> None:
    scores = np.array([0.0, bad, 1.0], dtype=np.float32)
    mask = np.array([True, True, False])
    rng = np.random.default_rng(0) if use_rng else None
    with pytest.raises(ValueError):
        decide(scores, mask, rng)
    with pytest.raises(ValueError):
        decide(np.full(3, -np.inf), np.ones(3, dtype=bool), rng)


def test_minus_inf_allowed_score_raises() -> None:
    with pytest.raises(ValueError):
        decide(np.array([0.0, -np.inf]), np.array([True, True]))


def test_empty_mask_raises() -> None:
    scores = np.zeros(4)
    mask = np.zeros(4, dtype=bool)
    with pytest.raises(ValueError, match="no candidate"):
        masked_log_softmax(scores, mask)
    with pytest.raises(ValueError, match="no candidate"):
        decide(scores, mask)
    with pytest.raises(ValueError, match="no candidate"):
        decide(scores, mask, np.random.default_rng(0))


def _decide_reference(scores: np.ndarray, mask: np.ndarray, rng=None) -> tuple[int, float]:
    """``decide`` as written before its checks moved behind one test of all scores (e630e1c)."""
    if not mask.any():
        raise ValueError("the mask allows no candidate")
    s = np.where(mask, scores.astype(np.float64), 0.0)
    if not np.isfinite(s).all():
        raise ValueError("non-finite scores from the policy")
    s[~mask] = -np.inf
    m = float(s.max())
    z = s - m
    e = np.exp(z)
    total = float(e.sum())
    if rng is None:
        a = int(np.argmax(z))
    else:
        a = int(np.searchsorted(np.cumsum(e), rng.random() * total, side="right"))
        if a >= len(e) or not mask[a]:
            a = int(np.flatnonzero(mask)[-1])
    return a, float(z[a]) - math.log(total)


@st.composite
def scores_with_non_finite(draw):
    """Scores and a mask (possibly empty) where some scores may be NaN or infinite."""
    scores, mask = draw(scores_and_mask())
    n = len(scores)
    for i in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        scores[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if draw(st.booleans()) and n < 8:
        mask[:] = False
    return scores, mask


@settings(max_examples=500, deadline=None)
@given(scores_with_non_finite(), st.booleans(), st.integers(0, 2**32 - 1))
def test_decide_equals_its_reference(sm, use_rng: bool, seed: int) -> None:
    """Same action, the same log-probability bit for bit, and the same refusals as before."""
    scores, mask = sm
    rngs = [np.random.default_rng(seed) if use_rng else None for _ in range(2)]
    try:
        want = _decide_reference(scores, mask, rngs[0])
    except ValueError as exc:
        with pytest.raises(ValueError, match=str(exc)):
            decide(scores, mask, rngs[1])
        return
    got = decide(scores, mask, rngs[1])
    assert got[0] == want[0]
    assert math.copysign(1, got[1]) == math.copysign(1, want[1])
    assert got[1] == want[1] or (math.isnan(got[1]) and math.isnan(want[1]))


# --------------------------------------------------------------------------------------------
# sample_batch (the vectorised twin)


def test_sample_batch_frequencies_and_mask() -> None:
    scores = np.array([0.0, 1.0, 2.0, -1.0, 0.5, 3.0])
    mask = np.array([True, True, False, True, True, False])
    p = np.where(mask, np.exp(scores), 0.0)
    p /= p.sum()
    n = 40_000
    acts, logp = sample_batch(
        np.tile(scores, (n, 1)), np.tile(mask, (n, 1)), np.random.default_rng(5)
    )
    assert acts.shape == (n,) and logp.shape == (n,)
    assert mask[acts].all()
    np.testing.assert_allclose(logp, np.log(p[acts]))
    freq = np.bincount(acts, minlength=len(scores)) / n
    np.testing.assert_allclose(freq, p, atol=0.01)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.data())
def test_sample_batch_never_picks_masked_out(seed, data) -> None:
    b = data.draw(st.integers(1, 8))
    n = data.draw(st.integers(1, 16))
    scores = data.draw(hnp.arrays(np.float64, (b, n), elements=st.floats(-1e6, 1e6)))
    masks = data.draw(hnp.arrays(np.bool_, (b, n)))
    masks[np.arange(b), data.draw(hnp.arrays(np.int64, b, elements=st.integers(0, n - 1)))] = True
    acts, logp = sample_batch(scores, masks, np.random.default_rng(seed))
    assert masks[np.arange(b), acts].all()
    for i in range(b):
        assert logp[i] == pytest.approx(masked_log_softmax(scores[i], masks[i])[acts[i]], abs=1e-9)


def test_sample_batch_raises() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        sample_batch(np.zeros((2, 3)), np.array([[True, False, False], [False] * 3]), rng)
    with pytest.raises(ValueError):
        sample_batch(np.array([[np.nan, 0.0, 0.0]]), np.ones((1, 3), dtype=bool), rng)


# --------------------------------------------------------------------------------------------
# scorers


def test_mlp_scorer_random_shape_and_determinism() -> None:
    g = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
    rows = _encoder_rows(g, Alloc(4, 2))
    m = MLPScorer.random(N_FEATURES, seed=1)
    s = m.scores(rows)
    assert s.shape == (g.n,)
    assert s.dtype == np.float32 and np.isfinite(s).all()
    np.testing.assert_array_equal(s, MLPScorer.random(N_FEATURES, seed=1).scores(rows))
    assert not np.allclose(s, MLPScorer.random(N_FEATURES, seed=2).scores(rows))
    assert np.ptp(s) > 0  # candidates are told apart
    assert MLPScorer.random(N_FEATURES, hidden=(8,)).scores(rows).shape == (g.n,)
    assert MLPScorer.random(N_FEATURES, hidden=()).scores(rows).shape == (g.n,)


def test_mlp_scorer_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        MLPScorer([np.zeros((3, 2))], [np.zeros(2)])
    with pytest.raises(ValueError):
        MLPScorer([np.zeros((3, 1))], [])
    with pytest.raises(ValueError):
        MLPScorer([], [])


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from([0.25, 0.5, 1.0]),
    st.integers(1, 8),
    st.sampled_from([32.0, 64.0]),
    st.integers(1, 8),
    st.integers(0, 1000),
    st.data(),
)
def test_mlp_scores_blocks_equal_scores_of_rows(cu, cn, mu, mn, seed, data) -> None:
    g = ResourceGrid(cpu_unit_cores=cu, cpu_units=cn, mem_unit_mb=mu, mem_units=mn)
    user = Alloc(data.draw(st.integers(1, cn)), data.draw(st.integers(1, mn)))
    enc = FeatureEncoder(g)
    m = MLPScorer.random(N_FEATURES, seed=seed)
    node = NodeState(4.0, 4096.0, 1.0, 512.0, 2)
    gs = SafeguardState(
        recent_cpu_peak_cores=data.draw(st.floats(0, 4)),
        recent_mem_peak_mb=data.draw(st.floats(0, 500)),
    )
    ctx = enc.context(node, FunctionStats(), gs, user, 0.0)
    cpu, mem = enc.blocks(gs, user)
    rows = enc.rows(ctx, gs, user)
    np.testing.assert_allclose(m.scores_blocks(ctx, cpu, mem), m.scores(rows), atol=1e-5)
    batch = m.scores_blocks(np.stack([ctx, ctx]), np.stack([cpu, cpu]), np.stack([mem, mem]))
    assert batch.shape == (2, g.n)
    np.testing.assert_allclose(batch[1], m.scores(rows), atol=1e-5)
    np.testing.assert_allclose(
        m.scores(expand_rows(np.stack([ctx]), cpu[None], mem[None]))[0], m.scores(rows), atol=1e-6
    )


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([0.25, 0.5, 1.0]),
    st.integers(1, 10),
    st.sampled_from([16.0, 64.0, 128.0]),
    st.integers(1, 10),
    st.data(),
)
def test_rule_scorer_user_size_picks_the_users_candidate(cu, cn, mu, mn, data) -> None:
    g = ResourceGrid(cpu_unit_cores=cu, cpu_units=cn, mem_unit_mb=mu, mem_units=mn)
    user = Alloc(data.draw(st.integers(1, cn)), data.draw(st.integers(1, mn)))
    rows = _encoder_rows(g, user)
    mask = data.draw(hnp.arrays(np.bool_, g.n))
    rule = fallback_scorer("user")
    s = rule.scores(rows)
    assert s.shape == (g.n,)
    mask[g.index(user)] = True
    assert decide(s, mask)[0] == g.index(user)
    # without the user's candidate it picks the allowed one closest in log-ratio terms
    mask[g.index(user)] = False
    if mask.any():
        a, _ = decide(s, mask)
        dist = np.abs(np.log2(g.cand_cpu / user.cpu)) + np.abs(np.log2(g.cand_mem / user.mem))
        assert dist[a] == pytest.approx(dist[mask].min(), abs=1e-5)


def test_rule_scorer_reproduces_fixed_under_the_safeguard() -> None:
    g = ResourceGrid(cpu_unit_cores=1.0, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
    user = Alloc(4, 4)
    gs = SafeguardState(
        calibrate=None,
        last_alloc=Alloc(3, 4),
        last_cpu_peak_cores=1.2,
        last_mem_peak_mb=100.0,
        recent_cpu_peak_cores=1.2,
        recent_mem_peak_mb=100.0,
    )
    gd = guard(g, user, gs)
    assert gd.mask.sum() > 1  # harvesting: the user's size is one option among several
    rows = _encoder_rows(g, user, gs)
    assert g.alloc(decide(fallback_scorer("user").scores(rows), gd.mask)[0]) == user


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 10),
    st.integers(1, 10),
    st.data(),
)
def test_smallest_rule_picks_the_lower_corner_of_the_safeguards_box(cn, mn, data) -> None:
    g = ResourceGrid(cpu_unit_cores=0.25, cpu_units=cn, mem_unit_mb=64.0, mem_units=mn)
    user = Alloc(data.draw(st.integers(1, cn)), data.draw(st.integers(1, mn)))
    cpu_lo = data.draw(st.integers(1, cn))
    mem_lo = data.draw(st.integers(1, mn))
    cpu_hi = data.draw(st.integers(cpu_lo, cn))
    mem_hi = data.draw(st.integers(mem_lo, mn))
    gs = SafeguardState(
        recent_cpu_peak_cores=data.draw(st.floats(0, 4)),
        recent_mem_peak_mb=data.draw(st.floats(0, 1000)),
    )
    mask = g.range_mask(cpu_lo, cpu_hi, mem_lo, mem_hi)
    a, logp = decide(fallback_scorer("smallest").scores(_encoder_rows(g, user, gs)), mask)
    assert g.alloc(a) == Alloc(cpu_lo, mem_lo) and logp <= 0.0


def test_rules_are_named_and_an_unknown_one_is_refused() -> None:
    assert set(RULES) == {"user", "smallest"}
    assert all(isinstance(fallback_scorer(r), RuleScorer) for r in RULES)
    with pytest.raises(ValueError, match="unknown rule 'largest'"):
        fallback_scorer("largest")


def test_rule_scorer_linear() -> None:
    rows = np.array([[1.0, -2.0], [3.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(RuleScorer(np.array([1.0, 1.0])).scores(rows), [-1.0, 7.0])
    np.testing.assert_allclose(
        RuleScorer(np.array([1.0, 1.0]), absolute=True).scores(rows), [3.0, 7.0]
    )


# --------------------------------------------------------------------------------------------
# ONNX


def _onnx_mlp(m: MLPScorer, input_name: str = ONNX_INPUT, output_name: str = ONNX_OUTPUT) -> bytes:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []
    x = input_name
    layers = list(zip(m.weights, m.biases))
    for i, (w, b) in enumerate(layers):
        inits.append(numpy_helper.from_array(np.asarray(w, np.float32), f"W{i}"))
        inits.append(numpy_helper.from_array(np.asarray(b, np.float32), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"z{i}"]))
        x = f"z{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Tanh", [x], [f"h{i}"]))
            x = f"h{i}"
    inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"))
    nodes.append(helper.make_node("Reshape", [x, "flat"], [output_name]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [
            helper.make_tensor_value_info(
                input_name, TensorProto.FLOAT, ["N", m.weights[0].shape[0]]
            )
        ],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_onnx_scorer_matches_the_mlp(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    m = MLPScorer.random(N_FEATURES, hidden=(32, 16), seed=11)
    blob = _onnx_mlp(m)
    g = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
    rows = _encoder_rows(g, Alloc(3, 5))
    want = m.scores(rows)
    from_bytes = OnnxScorer(blob)
    path = tmp_path / "policy.onnx"
    path.write_bytes(blob)
    for scorer in (from_bytes, OnnxScorer(path), OnnxScorer(str(path))):
        got = scorer.scores(rows)
        assert got.shape == (g.n,) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # random rows too (any batch size), and the decisions agree
    rows2 = np.random.default_rng(0).normal(size=(7, N_FEATURES)).astype(np.float32)
    np.testing.assert_allclose(from_bytes.scores(rows2), m.scores(rows2), atol=1e-5, rtol=0)
    mask = np.ones(g.n, dtype=bool)
    assert decide(from_bytes.scores(rows), mask)[0] == decide(want, mask)[0]


def test_onnx_scorer_kept_binding_equals_session_run() -> None:
    """Rows of a shape seen before run through a kept IO binding: the same scores as
    ``session.run``, and a returned array is not overwritten by the next call."""
    pytest.importorskip("onnxruntime")
    scorer = OnnxScorer(_onnx_mlp(MLPScorer.random(N_FEATURES, hidden=(32, 16), seed=3)))
    rng = np.random.default_rng(1)
    kept = []
    for i in range(20):
        n = (64, 1, 7)[i % 3]
        rows = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
        if i % 4 == 3:  # not contiguous
            rows = np.asfortranarray(rows)
        want = scorer.session.run([ONNX_OUTPUT], {ONNX_INPUT: rows})[0].reshape(-1)
        got = scorer.scores(rows)
        np.testing.assert_array_equal(got, want)
        kept.append((got, got.copy()))
    assert set(scorer._bound) == {(64, N_FEATURES), (1, N_FEATURES), (7, N_FEATURES)}
    for got, copy in kept:
        np.testing.assert_array_equal(got, copy)
    with pytest.raises(Exception, match="data type"):  # float64 rows: refused as before, not cast
        scorer.scores(rng.normal(size=(64, N_FEATURES)))


@pytest.mark.parametrize("names", [("x", ONNX_OUTPUT), (ONNX_INPUT, "y")])
def test_onnx_scorer_rejects_wrong_names(names) -> None:
    pytest.importorskip("onnxruntime")
    blob = _onnx_mlp(MLPScorer.random(N_FEATURES, hidden=(4,)), *names)
    with pytest.raises(ValueError):
        OnnxScorer(blob)
