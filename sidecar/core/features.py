"""The feature encoding: one normalised row per candidate allocation.

This is an interface with every exported model: the column order, units and scaling below are
stamped into the ONNX metadata as ``FEATURE_VERSION`` and ``schema_hash()``, and a model whose
stamp differs is refused. Change anything here and bump the version.

Each row = context (node + function, identical for all candidates) + candidate columns. The
context alone is also the critic's input. All scalings are fixed transforms (no running
statistics), so the simulator and a host encode identically with no shared state.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.safeguard import SafeguardState
from sidecar.core.stats import FunctionStats

FEATURE_VERSION = 2
"""2: the invocation's input size relative to the function's history (``input_vs_history``,
``input_known``)."""


@dataclass(frozen=True)
class Feature:
    name: str
    unit: str
    scaling: str


CONTEXT_FEATURES: tuple[Feature, ...] = (
    Feature("pending", "invocations", "log1p(x) / 5"),
    Feature("free_cpu", "cores", "free / total, clipped to [-1, 1]"),
    Feature("free_mem", "MB", "free / total, clipped to [-1, 1]"),
    Feature("inter_arrival", "s", "log10(x + 1e-3) / 4; 1 when unknown"),
    Feature("rate", "1/s", "log1p(x)"),
    Feature("mean_cpu_peak", "cores", "mean / user cores"),
    Feature("mean_mem_peak", "MB", "mean / user MB"),
    Feature("recent_cpu_peak", "cores", "peak since last safeguard run / user cores"),
    Feature("recent_mem_peak", "MB", "peak since last safeguard run / user MB"),
    Feature("mean_duration", "s", "log10(x + 1e-3) / 3"),
    Feature("baseline_duration", "s", "log10(x + 1e-3) / 3; mean duration when unknown"),
    Feature("user_cpu", "units", "user / grid max"),
    Feature("user_mem", "units", "user / grid max"),
    Feature("since_safeguard", "s", "log1p(x) / 10; 1 when never"),
    Feature("history", "invocations", "min(completions, 20) / 20"),
    Feature("slowdown", "ratio", "mean duration / baseline duration - 1, clipped to [-1, 3]"),
    Feature(
        "input_vs_history",
        "ratio",
        "log2(input / geometric mean of the function's past inputs) / 4, clipped to [-1, 1]; "
        "0 when unknown",
    ),
    Feature("input_known", "flag", "1 when the input and the function's input history are known"),
)
CANDIDATE_FEATURES: tuple[Feature, ...] = (
    # CPU columns first, then the same three for memory (the encoder fills them as two blocks).
    Feature("cand_cpu", "units", "candidate / grid max"),
    Feature("cand_cpu_vs_user", "ratio", "log2(candidate / user)"),
    Feature("cand_cpu_vs_peak", "ratio", "log2(candidate cores / (recent cpu peak + 0.05)) / 4"),
    Feature("cand_mem", "units", "candidate / grid max"),
    Feature("cand_mem_vs_user", "ratio", "log2(candidate / user)"),
    Feature("cand_mem_vs_peak", "ratio", "log2(candidate MB / (recent mem peak + 1)) / 4"),
)
FEATURES = CONTEXT_FEATURES + CANDIDATE_FEATURES
N_CONTEXT = len(CONTEXT_FEATURES)
N_FEATURES = len(FEATURES)
N_BLOCK = len(CANDIDATE_FEATURES) // 2
"""Columns per candidate block (CPU block, then memory block)."""
_CACHE_SIZE = 65536


def schema() -> dict:
    """The written schema, as stored in model metadata and shown in the docs."""
    return {
        "version": FEATURE_VERSION,
        "context": [asdict(f) for f in CONTEXT_FEATURES],
        "candidate": [asdict(f) for f in CANDIDATE_FEATURES],
    }


def schema_hash() -> str:
    return hashlib.sha256(json.dumps(schema(), sort_keys=True).encode()).hexdigest()[:16]


class NodeState(NamedTuple):
    """Node-level inputs: capacity, what is free now, and invocations waiting for admission."""

    total_cores: float
    total_mem_mb: float
    free_cores: float
    free_mem_mb: float
    pending: int = 0


class FeatureEncoder:
    """Encodes (node, function, user size) into the context vector and the candidate rows."""

    def __init__(self, grid: ResourceGrid) -> None:
        self.grid = grid
        cpu = np.arange(1, grid.cpu_units + 1, dtype=np.float64)
        mem = np.arange(1, grid.mem_units + 1, dtype=np.float64)
        self._cores = cpu * grid.cpu_unit_cores
        self._mb = mem * grid.mem_unit_mb
        self._log2_cpu = np.log2(cpu)
        self._log2_mem = np.log2(mem)
        self._log2_cores = np.log2(self._cores)
        self._log2_mb = np.log2(self._mb)
        self._cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._cpu_block = np.zeros((grid.cpu_units, N_BLOCK), dtype=np.float32)
        self._cpu_block[:, 0] = cpu / grid.cpu_units
        self._mem_block = np.zeros((grid.mem_units, N_BLOCK), dtype=np.float32)
        self._mem_block[:, 0] = mem / grid.mem_units

    def context(
        self,
        node: NodeState,
        stats: FunctionStats,
        guard_state: SafeguardState,
        user: Alloc,
        now_s: float,
        input_size: float | None = None,
    ) -> np.ndarray:
        """The node + function features (also the critic's input), shape (N_CONTEXT,).

        ``input_size``: this invocation's input, where the invoker reports one."""
        g = self.grid
        user_cores = user.cpu * g.cpu_unit_cores
        user_mb = user.mem * g.mem_unit_mb
        iat = stats.mean_iat_s
        mean_d = stats.mean_duration_s
        base_d = stats.baseline_duration_s
        known_base = base_d == base_d and base_d > 0
        since = now_s - stats.last_safeguard_s  # NaN when no user-size run yet
        if since < 0:  # a clock step back on a host; NaN compares False and stays NaN
            since = 0.0
        free_cpu = node.free_cores / node.total_cores
        free_mem = node.free_mem_mb / node.total_mem_mb
        slowdown = mean_d / base_d - 1.0 if known_base else 0.0
        rel = stats.input_vs_history(input_size) / 4.0  # NaN when unknown
        known_input = rel == rel
        return np.array(
            (
                math.log1p(node.pending) / 5.0,
                -1.0 if free_cpu < -1.0 else (1.0 if free_cpu > 1.0 else free_cpu),
                -1.0 if free_mem < -1.0 else (1.0 if free_mem > 1.0 else free_mem),
                math.log10(iat + 1e-3) / 4.0 if iat == iat else 1.0,
                math.log1p(stats.rate_per_s()),
                stats.mean_cpu_peak_cores / user_cores,
                stats.mean_mem_peak_mb / user_mb,
                guard_state.recent_cpu_peak_cores / user_cores,
                guard_state.recent_mem_peak_mb / user_mb,
                math.log10(mean_d + 1e-3) / 3.0,
                math.log10((base_d if known_base else mean_d) + 1e-3) / 3.0,
                user.cpu / g.cpu_units,
                user.mem / g.mem_units,
                math.log1p(since) / 10.0 if since == since else 1.0,
                (20 if stats.completions > 20 else stats.completions) / 20.0,
                -1.0 if slowdown < -1.0 else (3.0 if slowdown > 3.0 else slowdown),
                (-1.0 if rel < -1.0 else (1.0 if rel > 1.0 else rel)) if known_input else 0.0,
                1.0 if known_input else 0.0,
            ),
            dtype=np.float32,
        )

    def blocks(self, guard_state: SafeguardState, user: Alloc) -> tuple[np.ndarray, np.ndarray]:
        """The candidate columns as a (cpu_units, K) CPU block and a (mem_units, K) memory block.

        Every candidate column depends on the candidate's CPU or on its memory only, so the
        candidate part of the rows is these two small blocks broadcast over the cpu-major grid.
        They change only when a function's peak does, so they are cached (read-only arrays).
        """
        key = (
            user.cpu,
            user.mem,
            guard_state.recent_cpu_peak_cores,
            guard_state.recent_mem_peak_mb,
        )
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        cpu = self._cpu_block.copy()
        cpu[:, 1] = self._log2_cpu - math.log2(user.cpu)
        cpu[:, 2] = (self._log2_cores - math.log2(guard_state.recent_cpu_peak_cores + 0.05)) / 4
        mem = self._mem_block.copy()
        mem[:, 1] = self._log2_mem - math.log2(user.mem)
        mem[:, 2] = (self._log2_mb - math.log2(guard_state.recent_mem_peak_mb + 1.0)) / 4
        cpu.setflags(write=False)
        mem.setflags(write=False)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = (cpu, mem)
        return cpu, mem

    def rows(self, ctx: np.ndarray, guard_state: SafeguardState, user: Alloc) -> np.ndarray:
        """The (n_candidates, N_FEATURES) float32 matrix the score function consumes."""
        return expand_rows(ctx, *self.blocks(guard_state, user))


def expand_rows(
    ctx: np.ndarray,
    cpu: np.ndarray,
    mem: np.ndarray,
    out: np.ndarray | None = None,
    blocks: bool = True,
) -> np.ndarray:
    """Context (..., C) + blocks (..., cu, K), (..., mu, K) -> rows (..., cu * mu, N_FEATURES).

    Works on single observations and on batches (leading dimensions), in numpy. ``out``: a
    float32 (..., cu, mu, N_FEATURES) array to write into, which a caller deciding again and again
    keeps; ``blocks=False`` leaves its candidate columns as the last call wrote them (the same
    blocks again).
    """
    cu, mu = cpu.shape[-2], mem.shape[-2]
    lead = ctx.shape[:-1]
    if out is None:
        out = np.empty((*lead, cu, mu, N_FEATURES), dtype=np.float32)
    c = N_CONTEXT
    out[..., :c] = ctx[..., None, None, :]
    if blocks:
        out[..., c : c + N_BLOCK] = cpu[..., :, None, :]
        out[..., c + N_BLOCK :] = mem[..., None, :, :]
    return out.reshape(*lead, cu * mu, N_FEATURES)
