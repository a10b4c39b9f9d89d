"""Decider.decide: its kept row matrix gives the rows, guard and decision of the plain path."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.core import policy, safeguard
from sidecar.core.decision import Decider
from sidecar.core.features import N_FEATURES, NodeState, expand_rows
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.policy import MLPScorer
from sidecar.core.safeguard import SafeguardConfig, SafeguardState
from sidecar.core.stats import FunctionStats


class Recording:
    """An MLP scorer that keeps a copy of every row matrix it scored."""

    def __init__(self, seed: int) -> None:
        self.mlp = MLPScorer.random(N_FEATURES, (8,), seed=seed)
        self.seen: list[np.ndarray] = []

    def scores(self, rows: np.ndarray) -> np.ndarray:
        self.seen.append(rows.copy())
        return self.mlp.scores(rows)


@st.composite
def functions(draw, g: ResourceGrid) -> tuple[FunctionStats, SafeguardState, Alloc]:
    """A function's statistics, safeguard state and user size after a few invocations."""
    user = Alloc(draw(st.integers(1, g.cpu_units)), draw(st.integers(1, g.mem_units)))
    stats, gs = FunctionStats(), SafeguardState()
    for i in range(draw(st.integers(0, 4))):
        cpu = draw(st.floats(0.0, 1.5)) * g.cores(user.cpu)
        mem = draw(st.floats(0.0, 1.5)) * g.mb(user.mem)
        stats.on_arrival(float(i))
        guard = safeguard.guard(g, user, gs)
        gs.observe(guard, user, cpu, mem, failed=draw(st.booleans()) and i > 1)
        stats.on_completion(i + 0.5, 0.5, cpu, mem, at_user_size=guard.calibrating)
    return stats, gs, user


@st.composite
def decisions(draw):
    g = ResourceGrid(
        cpu_unit_cores=draw(st.sampled_from([0.25, 1.0])),
        cpu_units=draw(st.integers(1, 8)),
        mem_unit_mb=draw(st.sampled_from([32.0, 64.0])),
        mem_units=draw(st.integers(1, 8)),
    )
    pool = draw(st.lists(functions(g), min_size=1, max_size=3))
    calls = []
    for k in range(draw(st.integers(1, 8))):  # repeats of one function reuse its blocks
        stats, gs, user = pool[draw(st.integers(0, len(pool) - 1))]
        node = NodeState(8.0, 4096.0, draw(st.floats(-4.0, 8.0)), 2048.0, draw(st.integers(0, 5)))
        usage = draw(st.floats(0.0, 2.0)) * g.mb(user.mem)
        size = draw(st.one_of(st.none(), st.floats(1.0, 1e6)))
        calls.append((node, stats, gs, user, 10.0 + k, usage, size))
    return g, calls


@settings(max_examples=150, deadline=None)
@given(decisions(), st.integers(0, 1000))
def test_decide_equals_the_plain_path(case, seed: int) -> None:
    g, calls = case
    cfg = SafeguardConfig()
    decider, scorer = Decider(g, cfg), Recording(seed)
    for node, stats, gs, user, now, usage, size in calls:
        d = decider.decide(scorer, node, stats, gs, user, now, mem_usage_mb=usage, input_size=size)
        guard = safeguard.guard(g, user, gs, usage, cfg, size, node.pending)
        obs = Decider(g, cfg).observe(guard, node, stats, gs, user, now, size)
        rows = expand_rows(obs.context, obs.cpu, obs.mem)
        np.testing.assert_array_equal(scorer.seen[-1], rows)
        np.testing.assert_array_equal(d.obs.rows(), rows)
        assert d.guard[:6] == guard[:6] and np.array_equal(d.guard.mask, guard.mask)
        a, logp = policy.decide(scorer.mlp.scores(rows), guard.mask)
        assert d.action == a
        assert d.logp == logp or (math.isnan(d.logp) and math.isnan(logp))
        assert d.fallback is None
