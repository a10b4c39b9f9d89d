"""One decision, the same on a host and in the simulator.

guard (the safeguard's ranges and mask) -> observation (context vector + candidate blocks) ->
scores (any ``Scorer``) -> the masked decision (argmax, or a sample when given an rng). When the
scorer fails (raises, or returns non-finite scores) a fallback scorer decides instead, if one is
given: a model must never stop a decision on a host. The daemon's engine, the simulator's
``Learned`` and rule managers, its Gymnasium env (observation only: there the agent acts) and its
guard call all go through ``Decider``, so a policy trained in simulation sees exactly the inputs it
will see on a host.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sidecar.core import policy, safeguard
from sidecar.core.features import N_FEATURES, FeatureEncoder, NodeState, expand_rows
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.policy import Scorer
from sidecar.core.safeguard import Guard, SafeguardConfig, SafeguardState
from sidecar.core.stats import FunctionStats


class Observation(NamedTuple):
    """What a policy sees: the context, the candidate blocks and the safeguard's mask."""

    context: np.ndarray
    cpu: np.ndarray
    mem: np.ndarray
    mask: np.ndarray

    def rows(self) -> np.ndarray:
        """One feature row per candidate (``expand_rows``), what a scorer reads."""
        return expand_rows(self.context, self.cpu, self.mem)


class Decision(NamedTuple):
    guard: Guard
    obs: Observation
    action: int
    logp: float
    """Log-probability of ``action`` under the masked softmax of the scores that chose it."""
    fallback: str | None
    """Why the scorer failed and the fallback decided ("ValueError: ..."); None when it did not."""


class Decider:
    """The decision path for one grid; cheap to call per invocation (the encoder caches blocks,
    ``decide`` fills one kept row matrix). One caller at a time: a daemon's event loop, one
    simulator."""

    def __init__(self, grid: ResourceGrid, cfg: SafeguardConfig = SafeguardConfig()) -> None:
        self.grid = grid
        self.cfg = cfg
        self.encoder = FeatureEncoder(grid)
        self._rows = np.empty((grid.cpu_units, grid.mem_units, N_FEATURES), dtype=np.float32)
        self._rows_blocks: tuple[np.ndarray, np.ndarray] | None = None

    def _fill_rows(self, ctx: np.ndarray, cpu: np.ndarray, mem: np.ndarray) -> np.ndarray:
        """``expand_rows(ctx, cpu, mem)`` written into the kept matrix, which the scorer reads
        before the next decision rewrites it. The candidate columns are rewritten only when the
        blocks differ from the last ones: the encoder's cached blocks are read-only, so the same
        arrays hold the same values (and are held here, so their ids are not reused)."""
        last = self._rows_blocks
        fresh = last is None or last[0] is not cpu or last[1] is not mem
        self._rows_blocks = (cpu, mem)
        return expand_rows(ctx, cpu, mem, out=self._rows, blocks=fresh)

    def guard(
        self,
        user: Alloc,
        state: SafeguardState,
        mem_usage_mb: float = 0.0,
        input_size: float | None = None,
        pending: int = 0,
    ) -> Guard:
        """The safeguard's verdict; ``mem_usage_mb`` (the container's usage now: the memory floor),
        ``input_size`` (the input floor) and ``pending`` (the invocations waiting for admission)
        where the caller knows them."""
        return safeguard.guard(self.grid, user, state, mem_usage_mb, self.cfg, input_size, pending)

    def observe(
        self,
        guard: Guard,
        node: NodeState,
        stats: FunctionStats,
        state: SafeguardState,
        user: Alloc,
        now_s: float,
        input_size: float | None = None,
    ) -> Observation:
        ctx = self.encoder.context(node, stats, state, user, now_s, input_size)
        cpu, mem = self.encoder.blocks(state, user)
        return Observation(ctx, cpu, mem, guard.mask)

    def decide(
        self,
        scorer: Scorer,
        node: NodeState,
        stats: FunctionStats,
        state: SafeguardState,
        user: Alloc,
        now_s: float,
        *,
        guard: Guard | None = None,
        mem_usage_mb: float = 0.0,
        input_size: float | None = None,
        rng: np.random.Generator | None = None,
        fallback: Scorer | None = None,
    ) -> Decision:
        """guard -> observation -> scores -> masked decision.

        ``guard``: a verdict the caller already has from ``guard`` (the simulator computes one for
        every manager); else it is computed here from ``mem_usage_mb``, ``input_size`` and the
        node's ``pending``.
        ``input_size`` also feeds the features (the input relative to the function's history).
        Without ``fallback`` a failing scorer's exception propagates.
        """
        if guard is None:
            guard = self.guard(user, state, mem_usage_mb, input_size, node.pending)
        obs = self.observe(guard, node, stats, state, user, now_s, input_size)
        rows = self._fill_rows(obs.context, obs.cpu, obs.mem)
        try:
            a, logp = policy.decide(scorer.scores(rows), guard.mask, rng)
        except Exception as exc:
            if fallback is None:
                raise
            a, logp = policy.decide(fallback.scores(rows), guard.mask, rng)
            return Decision(guard, obs, a, logp, f"{type(exc).__name__}: {exc}")
        return Decision(guard, obs, a, logp, None)
