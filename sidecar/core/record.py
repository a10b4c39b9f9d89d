"""The trajectory record: one decision and its outcome, spooled by a node, read by the trainer.

A ``Record`` packs to a msgpack map (arrays as lists, the mask packed), version
``RECORD_VERSION``:

=================  ==============================================================================
``v``              record version (int)
``node``           host id; ``invocation``, ``function``, ``container`` (str)
``time``           wall-clock start, seconds since the epoch (float)
``feature_version`` / ``schema_hash``  the feature encoding the rows follow
``grid``           [cpu_unit_cores, cpu_units, mem_unit_mb, mem_units]
``model``          id of the scorer that decided ("sha256:<12 hex>" or "fallback")
``context``        context vector (N_CONTEXT floats)
``cpu_block``      [cpu_units][3] candidate CPU columns; ``mem_block`` [mem_units][3]
                   (rows = ``sidecar.core.features.expand_rows(context, cpu_block, mem_block)``)
``mask``           ``numpy.packbits`` of the boolean mask over the grid (bytes)
``action``         chosen candidate index; ``logp`` its log-probability under the masked softmax
``user`` / ``alloc``  user's grid point and the decided one, [cpu units, mem units]
``reason``         the safeguard's verdict, "cpu=<mode>,mem=<mode>"
``reward``         float, or None when no baseline exists yet (skip it)
``baseline_s``     baseline duration before this run (None if unknown); ``duration_s``
``outcome``        success | failure | oom | lost
``cpu_peak_cores``, ``mem_peak_mb``, ``give_backs`` (resources returned mid-run), ``inferred``
=================  ==============================================================================

Nodes ship records in batches (an envelope of version ``SCHEMA_VERSION``: ``schema_version``,
``node_id``, ``seq``, ``records``). A reader checks the fields in ``REQUIRED`` with
``check_batch`` and learns from ``learnable``; the rest is for analysis and the promotion gate.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from sidecar.core.features import FEATURE_VERSION, N_BLOCK, N_CONTEXT, schema_hash
from sidecar.core.grid import Alloc, ResourceGrid

RECORD_VERSION = 1
SCHEMA_VERSION = 1
"""Version of the batch envelope a shipper posts and the trainer reads."""
NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""A node id (the records' ``node``, a batch's ``node_id``), matched whole: ``is_node_id``."""
NODE_ID_RULE = "1-128 characters [A-Za-z0-9._:-], the first a letter or digit"


def is_node_id(node: object) -> bool:
    """Whether the trainer takes ``node`` as a node id; the sidecar's config refuses any other, so
    a node never runs to have every batch refused."""
    return isinstance(node, str) and NODE_ID_RE.fullmatch(node) is not None


OUTCOMES = ("success", "failure", "oom", "lost")
REQUIRED = (
    "v",
    "node",
    "function",
    "container",
    "time",
    "context",
    "cpu_block",
    "mem_block",
    "mask",
    "action",
    "logp",
    "reward",
    "duration_s",
    "outcome",
)
"""The fields every reader needs (and ``check_batch`` checks); a map lacking one is refused."""
_SCHEMA_HASH = schema_hash()


def grid_fields(grid: ResourceGrid) -> list[float | int]:
    """A grid as the record's ``grid`` field."""
    return [grid.cpu_unit_cores, grid.cpu_units, grid.mem_unit_mb, grid.mem_units]


@dataclass(frozen=True, kw_only=True, eq=False)
class Record:
    """One decision and its outcome (units: grid units, seconds, cores, MB)."""

    node: str
    invocation: str
    function: str
    container: str
    time: float
    grid: ResourceGrid
    model: str
    context: np.ndarray
    cpu_block: np.ndarray
    mem_block: np.ndarray
    mask: np.ndarray
    """Boolean, one entry per candidate."""
    action: int
    logp: float
    user: Alloc
    alloc: Alloc
    reason: str
    reward: float | None
    baseline_s: float | None
    duration_s: float
    outcome: str
    cpu_peak_cores: float
    mem_peak_mb: float
    give_backs: Sequence[str]
    inferred: bool

    def pack(self) -> dict[str, Any]:
        """The msgpack-able map of the module docstring, keys in that order."""
        return {
            "v": RECORD_VERSION,
            "node": self.node,
            "invocation": self.invocation,
            "function": self.function,
            "container": self.container,
            "time": self.time,
            "feature_version": FEATURE_VERSION,
            "schema_hash": _SCHEMA_HASH,
            "grid": grid_fields(self.grid),
            "model": self.model,
            "context": self.context.tolist(),
            "cpu_block": self.cpu_block.tolist(),
            "mem_block": self.mem_block.tolist(),
            "mask": np.packbits(self.mask).tobytes(),
            "action": self.action,
            "logp": self.logp,
            "user": list(self.user),
            "alloc": list(self.alloc),
            "reason": self.reason,
            "reward": self.reward,
            "baseline_s": self.baseline_s,
            "duration_s": self.duration_s,
            "outcome": self.outcome,
            "cpu_peak_cores": self.cpu_peak_cores,
            "mem_peak_mb": self.mem_peak_mb,
            "give_backs": list(self.give_backs),
            "inferred": self.inferred,
        }


# ------------------------------------------------------------------------------------ reading
class RecordError(ValueError):
    """A record a reader must refuse; ``unknown_version``: written by a newer node."""

    def __init__(self, reason: str, unknown_version: bool = False) -> None:
        super().__init__(reason, unknown_version)  # both in args: it pickles
        self.reason = reason
        self.unknown_version = unknown_version

    def __str__(self) -> str:
        return self.reason


_NUM = {float, int}
_INT = {int}
_STR = {str}
_BYTES = {bytes}
_DICT = {dict}
_TUPLE = {tuple}
_NONE = type(None)
_OUTCOMES = frozenset(OUTCOMES)
_BLOCK_LEN = {N_BLOCK}
F32_MAX = float(np.finfo(np.float32).max)
"""The largest magnitude the learner's float32 arrays hold (context, blocks, logp)."""
_REQUIRED = frozenset(REQUIRED)
_get_required = operator.itemgetter(*REQUIRED)
_flat = itertools.chain.from_iterable


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_batch(records: tuple, node: str) -> int:
    """Validate decoded records (msgpack arrays as tuples) completely; returns how many carry a
    reward. Raises RecordError naming the first offending record.

    Exact element types (``true`` or ``"1.5"`` is not a number here), shapes (every record on the
    first one's grid), finiteness, and for what the learner reads as float32 (context, blocks,
    logp) finiteness in float32: a 1e308 context value, finite here, would be an infinity there
    and turn a whole update into NaNs. First column-wise over the whole batch (``_check_fast``, one
    pass per field, not per record); only if that finds anything wrong does the record-by-record
    loop run, to name the first offending record and its reason.
    """
    first = records[0]
    if (
        not isinstance(first, dict)
        or type(first.get("cpu_block")) is not tuple
        or type(first.get("mem_block")) is not tuple
    ):
        raise RecordError("records[0] is not a map with cpu_block and mem_block arrays")
    cu, mu = len(first["cpu_block"]), len(first["mem_block"])
    if not 1 <= cu <= 256 or not 1 <= mu <= 256:
        raise RecordError("cpu_block and mem_block need 1..256 rows")
    n_cand = cu * mu
    mask_len = (n_cand + 7) // 8
    try:
        rewarded = _check_fast(records, node, cu, mu, mask_len, n_cand)
    except Exception:  # anything odd (unhashable, missing key, overflow): the exact loop decides
        rewarded = None
    if rewarded is not None:
        return rewarded
    return _check_exact(records, node, cu, mu, mask_len, n_cand)


def _check_fast(
    records: tuple, node: str, cu: int, mu: int, mask_len: int, n_cand: int
) -> int | None:
    """The records' rewarded count if every record is valid, else None (never a false pass).

    The same predicates as ``_check_exact``, evaluated column-wise over the whole batch with
    C-level iteration (itemgetter, zip, set(map(type, ...)), min/max/sum, numpy for the array
    values and the action bits) instead of a Python loop per record. It may answer None for a
    valid batch (e.g. array values beyond 1e300): the exact loop then decides, and it alone words
    the reasons. ``tests/training/test_fuzz_ingest.py`` checks both agree.
    """
    if set(map(type, records)) != _DICT:
        return None
    # a missing key raises KeyError here: the exact loop reports it
    (vs, nodes, fns, cts, ts, ctxs, cpus, mems, masks, acts, lps, rws, ds, outs) = zip(
        *map(_get_required, records)
    )
    if set(map(type, vs)) != _INT or set(vs) != {RECORD_VERSION}:
        return None
    if set(map(type, nodes)) != _STR or set(nodes) != {node}:
        return None
    if set(map(type, fns)) != _STR or set(map(type, cts)) != _STR:
        return None
    if max(map(len, fns)) > 512 or max(map(len, cts)) > 512:
        return None
    if set(map(type, outs)) != _STR or not set(outs) <= _OUTCOMES:
        return None
    if not (set(map(type, ts)) | set(map(type, ds)) | set(map(type, lps))) <= _NUM:
        return None
    # NaN and infinities make a sum non-finite (min/max alone skip a NaN)
    if not math.isfinite(sum(ts) + sum(ds) + sum(lps)):
        return None
    if min(ds) < 0 or min(ts) < 0 or max(lps) > 1e-6 or min(lps) < -F32_MAX:
        return None
    rtypes = set(map(type, rws))
    if _NONE in rtypes:
        rtypes.discard(_NONE)
        rws = [r for r in rws if r is not None]
    if not rtypes <= _NUM:
        return None
    if rws:
        if not math.isfinite(sum(rws)) or min(rws) < -1e6 or max(rws) > 1e6:
            return None
    rewarded = len(rws)
    if set(map(type, ctxs)) | set(map(type, cpus)) | set(map(type, mems)) != _TUPLE:
        return None
    if set(map(len, ctxs)) != {N_CONTEXT} or set(map(len, cpus)) != {cu}:
        return None
    if set(map(len, mems)) != {mu}:
        return None
    rows = list(_flat(cpus))
    rows += _flat(mems)
    if set(map(type, rows)) != _TUPLE or set(map(len, rows)) != _BLOCK_LEN:
        return None
    nums = list(_flat(ctxs))
    nums += _flat(rows)
    if not set(map(type, nums)) <= _NUM:
        return None
    # the float32 bound on every value, vectorised: a NaN fails it (numpy's max propagates NaN),
    # so does an infinity or a float64 value beyond float32, whatever the other records hold
    if not float(np.abs(np.array(nums, dtype=np.float64)).max()) <= F32_MAX:
        return None
    if set(map(type, acts)) != _INT or set(map(type, masks)) != _BYTES:
        return None
    if set(map(len, masks)) != {mask_len} or min(acts) < 0 or max(acts) >= n_cand:
        return None
    a = np.fromiter(acts, dtype=np.int64, count=len(acts))
    bits = np.frombuffer(b"".join(masks), dtype=np.uint8).reshape(len(masks), mask_len)
    allowed = (bits[np.arange(len(a)), a >> 3] >> (7 - (a & 7))) & 1
    if not allowed.all():
        return None
    return rewarded


def _check_exact(records: tuple, node: str, cu: int, mu: int, mask_len: int, n_cand: int) -> int:
    """Record by record: raises RecordError with the first offending record's reason."""
    rewarded = 0
    chain = itertools.chain.from_iterable
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise RecordError(f"records[{i}] is not a map")
        v = rec.get("v")
        if not _is_int(v):
            raise RecordError(f"records[{i}].v must be an integer")
        if v != RECORD_VERSION:
            raise RecordError(f"records[{i}]: unknown record version {v}", unknown_version=True)
        if not _REQUIRED <= rec.keys():
            raise RecordError(f"records[{i}] lacks {sorted(_REQUIRED - rec.keys())}")
        if rec["node"] != node:
            raise RecordError(f"records[{i}].node differs from node_id")
        fn, ct, out = rec["function"], rec["container"], rec["outcome"]
        if type(fn) is not str or type(ct) is not str or len(fn) > 512 or len(ct) > 512:
            raise RecordError(f"records[{i}]: function and container must be strings")
        if type(out) is not str or out not in _OUTCOMES:
            raise RecordError(f"records[{i}].outcome must be one of {', '.join(OUTCOMES)}")
        t, d, lp = rec["time"], rec["duration_s"], rec["logp"]
        if type(t) not in _NUM or type(d) not in _NUM or type(lp) not in _NUM:
            raise RecordError(f"records[{i}]: time, duration_s and logp must be numbers")
        # comparisons are False for NaN, and one sum catches any infinity
        if not (d >= 0 and -F32_MAX <= lp <= 1e-6 and t >= 0 and math.isfinite(t + d + lp)):
            raise RecordError(
                f"records[{i}]: time, duration_s >= 0, logp <= 0, all finite (logp in float32)"
            )
        r = rec["reward"]
        if r is not None:
            if type(r) not in _NUM or not -1e6 <= r <= 1e6:
                raise RecordError(f"records[{i}].reward must be null or a finite number")
            rewarded += 1
        ctx, cpu, mem = rec["context"], rec["cpu_block"], rec["mem_block"]
        if not (type(ctx) is tuple and type(cpu) is tuple and type(mem) is tuple):
            raise RecordError(f"records[{i}]: context, cpu_block and mem_block must be arrays")
        if len(ctx) != N_CONTEXT or len(cpu) != cu or len(mem) != mu:
            raise RecordError(
                f"records[{i}]: context needs {N_CONTEXT} numbers, blocks {cu} and {mu} rows"
            )
        rows = set(map(type, cpu))
        rows.update(map(type, mem))
        if rows != _TUPLE or set(map(len, cpu)) | set(map(len, mem)) != _BLOCK_LEN:
            raise RecordError(f"records[{i}]: block rows must be arrays of {N_BLOCK} numbers")
        types = set(map(type, ctx))
        types.update(map(type, chain(cpu)))
        types.update(map(type, chain(mem)))
        if not types <= _NUM:
            raise RecordError(f"records[{i}]: context and blocks must hold numbers only")
        # a finite sum means no NaN and no infinity; values within float32's range (at most
        # 16 + 512 * N_BLOCK of them) cannot overflow it, so a non-finite sum is a bad value too
        total = sum(ctx) + sum(map(sum, cpu)) + sum(map(sum, mem))
        if not math.isfinite(total) or max(map(abs, chain((ctx, *cpu, *mem)))) > F32_MAX:
            raise RecordError(
                f"records[{i}]: context or blocks hold a number that is not finite in float32"
            )
        a, mask = rec["action"], rec["mask"]
        if not _is_int(a) or type(mask) is not bytes:
            raise RecordError(f"records[{i}]: action must be an integer, mask bytes")
        if len(mask) != mask_len:
            raise RecordError(f"records[{i}].mask has {len(mask)} bytes, expected {mask_len}")
        if not 0 <= a < n_cand or not (mask[a >> 3] >> (7 - (a & 7))) & 1:
            raise RecordError(f"records[{i}].action {a} is not an allowed candidate")
    return rewarded


class Learnable(NamedTuple):
    """Learnable records as arrays, one row per record."""

    context: np.ndarray
    """(n, N_CONTEXT) float32"""
    cpu: np.ndarray
    """(n, cpu_units, N_BLOCK) float32"""
    mem: np.ndarray
    """(n, mem_units, N_BLOCK) float32"""
    mask: np.ndarray
    """(n, candidates) bool"""
    action: np.ndarray
    """(n,) int64"""
    logp: np.ndarray
    """(n,) float32"""
    reward: np.ndarray
    """(n,) float32"""


def readable(record: dict, grid: ResourceGrid) -> bool:
    """Whether a reader on ``grid`` with this host's feature encoding can use ``record``: this
    grid's blocks, this grid, feature version and schema hash where the record names them. A node
    on another encoding (an older sidecar mid-rollout) ships rows whose columns mean something
    else, and ``check_batch`` accepts them (the lengths agree)."""
    return (
        len(record["cpu_block"]) == grid.cpu_units
        and len(record["mem_block"]) == grid.mem_units
        and (record.get("grid") is None or list(record["grid"]) == grid_fields(grid))
        and record.get("feature_version", FEATURE_VERSION) == FEATURE_VERSION
        and record.get("schema_hash", _SCHEMA_HASH) == _SCHEMA_HASH
    )


def learnable(records: Sequence[dict], grid: ResourceGrid) -> Learnable | None:
    """The records a learner on ``grid`` can use (a finite reward and log-probability,
    ``readable``) as arrays; None if there are none."""
    keep = [
        r
        for r in records
        if r.get("reward") is not None
        and math.isfinite(r["reward"])
        and math.isfinite(r["logp"])
        and readable(r, grid)
    ]
    if not keep:
        return None
    masks = np.unpackbits(
        np.frombuffer(b"".join(r["mask"] for r in keep), np.uint8).reshape(len(keep), -1), axis=1
    )[:, : grid.n].astype(bool)
    return Learnable(
        context=np.asarray([r["context"] for r in keep], np.float32),
        cpu=np.asarray([r["cpu_block"] for r in keep], np.float32),
        mem=np.asarray([r["mem_block"] for r in keep], np.float32),
        mask=masks,
        action=np.asarray([int(r["action"]) for r in keep], np.int64),
        logp=np.asarray([float(r["logp"]) for r in keep], np.float32),
        reward=np.asarray([float(r["reward"]) for r in keep], np.float32),
    )
