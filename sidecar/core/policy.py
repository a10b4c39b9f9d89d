"""The score-function decision: candidate rows + mask -> one allocation.

One small network scores every candidate row; masked scores go through a softmax into one
categorical action, so the network does not grow with the action space. The scorer is pluggable:
numpy MLP weights (simulator, tests), an ONNX session (the daemon), or a fixed rule (``RULES``:
what the daemon runs without a working model, and the simulator's model-free managers).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from sidecar.core.features import FEATURES

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

ONNX_INPUT = "rows"
ONNX_OUTPUT = "scores"
_MAX_BINDINGS = 8
"""Row shapes an ``OnnxScorer`` keeps an IO binding for (the daemon uses one: its grid's)."""


class Scorer(Protocol):
    def scores(self, rows: np.ndarray) -> np.ndarray:
        """One float score per row of an (n, N_FEATURES) float32 matrix."""
        ...


class MLPScorer:
    """A tanh MLP in numpy: weights[i] is (in, out), the last layer has one output."""

    def __init__(self, weights: list[np.ndarray], biases: list[np.ndarray]) -> None:
        if len(weights) != len(biases) or not weights or weights[-1].shape[1] != 1:
            raise ValueError("an MLP scorer needs matching weights/biases ending in one output")
        self.weights = [np.asarray(w, dtype=np.float32) for w in weights]
        self.biases = [np.asarray(b, dtype=np.float32) for b in biases]

    @classmethod
    def random(cls, n_in: int, hidden: tuple[int, ...] = (32, 16), seed: int = 0) -> MLPScorer:
        rng = np.random.default_rng(seed)
        sizes = (n_in, *hidden, 1)
        ws = [rng.normal(0, 1 / np.sqrt(a), (a, b)) for a, b in zip(sizes, sizes[1:])]
        return cls(ws, [np.zeros(b) for b in sizes[1:]])

    def scores(self, rows: np.ndarray) -> np.ndarray:
        h = rows
        for w, b in zip(self.weights[:-1], self.biases[:-1]):
            h = np.tanh(h @ w + b)
        return (h @ self.weights[-1] + self.biases[-1])[..., 0]

    def scores_blocks(self, ctx: np.ndarray, cpu: np.ndarray, mem: np.ndarray) -> np.ndarray:
        """Same scores as ``scores(expand_rows(ctx, cpu, mem))``, without building the rows.

        The first layer is linear, so it splits into a context term (once per decision), a CPU
        term (one per CPU value) and a memory term (one per memory value), broadcast-added.
        Accepts one observation or a batch (leading dimension) of them.
        """
        w1, b1 = self.weights[0], self.biases[0]
        c, k = ctx.shape[-1], cpu.shape[-1]
        h_cpu = cpu @ w1[c : c + k]
        h_cpu += (ctx @ w1[:c] + b1)[..., None, :]
        h = h_cpu[..., :, None, :] + (mem @ w1[c + k :])[..., None, :, :]
        np.tanh(h, out=h)  # in place: this (batch, cpu, mem, hidden) array is the hot spot
        h = h.reshape(*h.shape[:-3], -1, w1.shape[1])
        for w, b in zip(self.weights[1:-1], self.biases[1:-1]):
            h = h @ w
            h += b
            np.tanh(h, out=h)
        return (h @ self.weights[-1])[..., 0] + self.biases[-1][0]


def onnx_session(path: str | Path | bytes) -> InferenceSession:
    """A CPU onnxruntime session that runs on its caller's thread: the default pool would start
    a thread per core, more than the sidecar unit's TasksMax allows on a large host."""
    import onnxruntime as ort  # imported here: the simulator's numpy path does not need it

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    src = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


class OnnxScorer:
    """Scores with onnxruntime on one thread: a few microseconds for 64 candidates, no torch."""

    def __init__(self, path: str | Path | bytes) -> None:
        self.session = onnx_session(path)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [ONNX_INPUT] or outputs[:1] != [ONNX_OUTPUT]:
            raise ValueError(
                f"model must map {ONNX_INPUT!r} to {ONNX_OUTPUT!r}, has {inputs} -> {outputs}"
            )
        self._bound: dict[tuple[int, ...], tuple[object, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """The model's scores for ``rows``; float32 rows of a shape seen before run through a
        kept IO binding (a quarter cheaper warm than ``session.run``, which converts its inputs
        and outputs on every call)."""
        bound = self._bound.get(rows.shape) if rows.dtype == np.float32 else None
        if bound is None:
            out = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: rows})[0]
            if (
                rows.dtype == np.float32
                and rows.size
                and isinstance(out, np.ndarray)
                and out.dtype == np.float32
                and len(self._bound) < _MAX_BINDINGS
            ):
                self._bind(rows.shape, out.shape)
            return np.asarray(out, dtype=np.float32).reshape(-1)
        binding, inp, out = bound
        with self._lock:  # one kept buffer pair per shape: calls from two threads take turns
            inp[...] = rows
            self.session.run_with_iobinding(binding)
            return out.reshape(-1).copy()  # a copy: the next call overwrites ``out``

    def _bind(self, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        """Keep an input and an output buffer for ``shape`` bound to the session."""
        import onnxruntime as ort

        inp = np.zeros(shape, dtype=np.float32)
        out = np.zeros(out_shape, dtype=np.float32)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(ONNX_INPUT, ort.OrtValue.ortvalue_from_numpy(inp))
        binding.bind_ortvalue_output(ONNX_OUTPUT, ort.OrtValue.ortvalue_from_numpy(out))
        self._bound[shape] = (binding, inp, out)


class RuleScorer:
    """A fixed linear rule over feature columns (``absolute``: over their absolute values)."""

    def __init__(self, weights: np.ndarray, absolute: bool = False) -> None:
        self.weights = np.asarray(weights, dtype=np.float32)
        self.absolute = absolute

    def scores(self, rows: np.ndarray) -> np.ndarray:
        x = np.abs(rows) if self.absolute else rows
        return x @ self.weights


RULES: dict[str, tuple[tuple[str, ...], bool]] = {
    "user": (("cand_cpu_vs_user", "cand_mem_vs_user"), True),
    "smallest": (("cand_cpu", "cand_mem"), False),
}
"""The model-free rules: columns scored -1 each, and whether over their absolute values.

``user``: the allowed candidate closest to the user's size (-(|log2 cpu/user| + |log2 mem/user|)),
so Fixed wherever the safeguard allows the user's size. ``smallest``: the fewest resources
(-(cpu/max + mem/max)); the safeguard's mask is a box, so that is its (cpu_lo, mem_lo) corner.
"""


def fallback_scorer(rule: str = "user") -> RuleScorer:
    """The model-free rule ``rule`` (a ``RULES`` name) as a scorer: what the daemon decides with
    when no model is loaded or the model fails."""
    try:
        columns, absolute = RULES[rule]
    except KeyError:
        raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(RULES)}") from None
    w = np.array([-1.0 if f.name in columns else 0.0 for f in FEATURES], dtype=np.float32)
    return RuleScorer(w, absolute)


def masked_log_softmax(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """log pi(a) over allowed candidates; -inf where masked out."""
    if not mask.any():
        raise ValueError("the mask allows no candidate")
    s = np.where(mask, scores.astype(np.float64), -np.inf)
    z = s - s.max()
    return z - np.log(np.exp(z).sum())


def decide(
    scores: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
) -> tuple[int, float]:
    """Pick a candidate: sample when ``rng`` is given (training), else argmax (deployment).

    Returns the candidate index and its log-probability under the masked softmax. Non-finite
    scores among the allowed candidates are refused: a model emitting NaN must never pick an
    allocation.
    """
    # Few and cheap numpy calls on the daemon's per-invocation path (a reduction such as max()
    # or all() costs about 3 us there, argmax and count_nonzero under 1 us): the max is read at
    # the argmax (a NaN counts as the largest), and the precise checks run only when some score
    # is not finite or the max is not (a refusal, or no candidate).
    s = np.where(mask, scores.astype(np.float64), -np.inf)
    a = int(s.argmax())  # the first best: the argmax of z = s - m too (z = 0 exactly where s = m)
    m = s.item(a)
    if not math.isfinite(m) or np.count_nonzero(np.isfinite(scores)) < scores.size:
        if not mask.any():
            raise ValueError("the mask allows no candidate")
        if not np.isfinite(scores[mask]).all():
            raise ValueError("non-finite scores from the policy")
    z = s - m
    e = np.exp(z)
    total = float(e.sum())
    if rng is not None:
        a = int(np.searchsorted(np.cumsum(e), rng.random() * total, side="right"))
        if a >= len(e) or not mask[a]:  # floating-point edge at the end of the cumsum
            a = int(np.flatnonzero(mask)[-1])
    return a, float(z[a]) - math.log(total)


def sample_batch(
    scores: np.ndarray, masks: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample one action per row of a (batch, n) score matrix, with log-probs.

    The vectorised twin of ``decide`` for rollouts that step several environments at once. The
    exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p (the Gumbel-max trick
    without the logarithms); masked-out candidates have p = 0 and never win.
    """
    if not masks.any(axis=1).all():
        raise ValueError("a mask allows no candidate")
    if (masks & ~np.isfinite(scores)).any():
        raise ValueError("non-finite scores from the policy")
    s = np.where(masks, scores.astype(np.float64), -np.inf)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    actions = np.argmax(e / rng.standard_exponential(e.shape), axis=1)
    rows = np.arange(len(actions))
    return actions, np.log(e[rows, actions] / e.sum(axis=1))
