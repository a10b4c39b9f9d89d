"""Policy models on a host: load, validate, hot-swap, roll back. No torch, only onnxruntime.

A candidate model is swapped in only after every check passed:

1. the file is readable; its sha256 matches ``[model] sha256`` or the ``sha256`` of the
   ``<path>.json`` written by ``training.export`` (when either exists);
2. onnxruntime opens it (a truncated file fails here) and it maps ``rows`` to ``scores``;
3. its metadata carries this host's ``feature_version`` and ``schema_hash`` (and the same grid,
   when it names one): a model trained on other features would score garbage;
4. on a probe batch of real encoder rows it returns one finite score per row.

On failure the running model stays and the reason is kept (``/debug/model``, logs, metric). With
no model file at the default path the daemon runs the model-free rule ``[model] rule``
(``sidecar.core.policy.RULES``; ``user`` is Fixed wherever the safeguard allows the user's size)
and says so in ``/readyz``. ``rollback()`` returns to the previous model (the daemon calls it
after repeated non-finite decisions at run time, the model poller when a new model slows
invocations down) and tells ``on_rollback`` (the poller, which remembers it on disk). A model
rolled back is refused from then on, across SIGHUPs and restarts (its sha256 is kept in
``rolled_back_file``, beside the state file), until the file holds another model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sidecar.core.features import FEATURE_VERSION, FeatureEncoder, NodeState, schema_hash
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.policy import OnnxScorer, Scorer, fallback_scorer, onnx_session
from sidecar.core.safeguard import SafeguardState
from sidecar.core.stats import FunctionStats
from sidecar.durable import write_atomic

log = logging.getLogger("faasrm.models")


def _models_dir() -> Path:
    """Where the shipped models are: ``models/`` beside this package in a source tree or an
    editable install, else ``<prefix>/share/faasrm/models`` of a wheel install (pyproject's
    data-files)."""
    tree = Path(__file__).resolve().parent.parent / "models"
    if tree.is_dir():
        return tree
    return Path(sys.prefix) / "share" / "faasrm" / "models"


MODELS_DIR = _models_dir()


def model_grid(path: str | Path) -> ResourceGrid | None:
    """The grid a model file declares in its metadata (a model only loads on its own grid), so
    tools can configure a sidecar for it; None when it declares none or cannot be read."""
    try:
        sess = onnx_session(path)
        return ResourceGrid(**json.loads(sess.get_modelmeta().custom_metadata_map["grid"]))
    except Exception:  # noqa: BLE001 (missing, corrupt, no grid: the loader says why)
        return None


def default_model_path(grid: ResourceGrid | None = None) -> Path:
    """The shipped model for ``grid``: ``models/default.onnx`` (8-core invokers, 1-core units),
    unless it declares another grid and a shipped sibling declares this one (``invoker.onnx``:
    quarter cores for 2-core hosts). A model only loads on its own grid, so an empty
    ``[model] path`` must pick the one that fits ``[grid]``."""
    default = MODELS_DIR / "default.onnx"
    if grid is None or model_grid(default) in (None, grid):
        return default
    for path in sorted(MODELS_DIR.glob("*.onnx")):
        if model_grid(path) == grid:
            return path
    return default  # refused on its grid, with the reason, and the rule fallback runs


def is_sha256(x: object) -> bool:
    """A sha256 as this package stores it (64 hex digits' length)."""
    return isinstance(x, str) and len(x) == 64


class ModelRejected(ValueError):
    pass


@dataclass
class Loaded:
    scorer: Scorer
    id: str
    source: str
    """"onnx" or "fallback"."""
    path: str | None = None
    sha256: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    loaded_at: float = field(default_factory=time.time)
    note: str | None = None

    def describe(self) -> dict:
        return {
            "id": self.id,
            "source": self.source,
            "path": self.path,
            "sha256": self.sha256,
            "metadata": self.metadata,
            "loaded_at": self.loaded_at,
            "note": self.note,
        }


def probe_rows(grid: ResourceGrid) -> list[np.ndarray]:
    """Real encoder rows for a few plausible states (a new function, a busy one, a tiny one)."""
    enc = FeatureEncoder(grid)
    user = grid.nearest(grid.max_cores / 2, grid.max_mb / 2)
    out = []
    for free, peak_c, peak_m in (
        (1.0, 0.0, 0.0),
        (0.1, grid.max_cores, grid.max_mb),
        (-0.5, 0.1, 8.0),
    ):
        node = NodeState(
            grid.max_cores * 4, grid.max_mb * 4, free * grid.max_cores, free * grid.max_mb, 3
        )
        st = FunctionStats()
        st.on_arrival(0.0)
        st.on_arrival(2.5)
        st.on_completion(3.0, 0.4, peak_c, peak_m, at_user_size=True)
        gs = SafeguardState(
            calibrate=None,
            last_alloc=Alloc(user.cpu, user.mem),
            recent_cpu_peak_cores=peak_c,
            recent_mem_peak_mb=peak_m,
        )
        ctx = enc.context(node, st, gs, user, 4.0)
        out.append(enc.rows(ctx, gs, user))
    out.append(out[0][:1])  # a batch of one
    return out


def validate(
    data: bytes, grid: ResourceGrid, expected_sha256: str | None
) -> tuple[OnnxScorer, dict]:
    """All the checks of the module docstring; raises ModelRejected with the reason."""
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 and sha != expected_sha256.lower():
        raise ModelRejected(
            f"sha256 {sha[:16]}... does not match the expected {expected_sha256[:16]}..."
        )
    try:
        scorer = OnnxScorer(data)
    except ValueError as exc:
        raise ModelRejected(str(exc)) from None
    except Exception as exc:  # onnxruntime raises its own types for corrupt/truncated files
        raise ModelRejected(
            f"onnxruntime cannot load it: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    meta = dict(scorer.session.get_modelmeta().custom_metadata_map)
    if meta.get("feature_version") != str(FEATURE_VERSION):
        raise ModelRejected(
            f"feature_version {meta.get('feature_version')!r} in its metadata, "
            f"this host needs {FEATURE_VERSION}"
        )
    if meta.get("schema_hash") != schema_hash():
        raise ModelRejected(
            f"schema_hash {meta.get('schema_hash')!r} differs from this host's {schema_hash()}"
        )
    if "grid" in meta:
        try:
            model_grid = json.loads(meta["grid"])
        except ValueError:
            raise ModelRejected("unparseable grid in its metadata") from None
        if model_grid != dataclasses.asdict(grid):
            raise ModelRejected(
                f"trained for grid {model_grid}, this host uses {dataclasses.asdict(grid)}"
            )
    for rows in probe_rows(grid):
        try:
            scores = scorer.scores(rows)
        except Exception as exc:
            raise ModelRejected(
                f"fails on a probe batch: {type(exc).__name__}: {str(exc)[:200]}"
            ) from None
        if scores.shape != (len(rows),):
            raise ModelRejected(
                f"returns shape {scores.shape} for {len(rows)} rows (wrong output shape)"
            )
        if not np.isfinite(scores).all():
            raise ModelRejected("returns non-finite scores on a probe batch")
    return scorer, meta


def _expected_sha(path: Path, configured: str) -> str | None:
    if configured:
        return configured
    side = Path(str(path) + ".json")
    try:
        sha = json.loads(side.read_text()).get("sha256")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelRejected(f"unreadable {side.name}: {exc}") from None
    return sha if isinstance(sha, str) else None


class ModelManager:
    def __init__(
        self,
        grid: ResourceGrid,
        path: str = "",
        sha256: str = "",
        rule: str = "user",
        rolled_back_file: Path | None = None,
    ) -> None:
        self.grid = grid
        self.rolled_back_file = rolled_back_file
        self.rolled_back: set[str] = self._read_rolled_back()
        """sha256 of the models rolled back on this node (kept in ``rolled_back_file``): a model
        that failed at run time would fail again, so it is refused until its file changes."""
        self.rule = rule
        self.fallback = Loaded(fallback_scorer(rule), "fallback", "fallback")
        """The model-free rule, run while no model is loaded (the engine's fallback too)."""
        self.configure(path, sha256, rule)
        self.current = self.fallback
        self.previous: Loaded | None = None
        self.on_rollback: list[Callable[[Loaded, Loaded, str], None]] = []
        """Called with (the model rolled back, the one now running, why) after a rollback."""
        self.last_error: dict | None = None
        self.loads_ok = 0
        self.loads_failed = 0

    def _read_rolled_back(self) -> set[str]:
        if self.rolled_back_file is None:
            return set()
        try:
            saved = json.loads(self.rolled_back_file.read_text())["rolled_back_sha256"]
            return {x for x in saved if is_sha256(x)}
        except FileNotFoundError:
            return set()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error(
                "unreadable list of rolled-back models, starting without it",
                extra={"path": str(self.rolled_back_file), "reason": str(exc)},
            )
            return set()

    def _save_rolled_back(self) -> None:
        """Persist ``rolled_back``; a disk that cannot take it costs the memory across restarts,
        never the rollback."""
        if self.rolled_back_file is None:
            return
        data = json.dumps({"rolled_back_sha256": sorted(self.rolled_back)}).encode()
        try:
            write_atomic(self.rolled_back_file, data)
        except OSError as exc:
            log.error(
                "rolled-back models not saved",
                extra={"path": str(self.rolled_back_file), "reason": str(exc)},
            )

    def configure(self, path: str, sha256: str, rule: str = "user") -> None:
        """Set ``[model] path`` / ``sha256`` / ``rule`` (start-up, config reload); an empty path
        resolves once to the shipped model of this grid (that opens each candidate's metadata)."""
        self.configured_path = path
        self.sha256 = sha256
        self.path = Path(path) if path else default_model_path(self.grid)
        if rule != self.rule:
            self.rule = rule
            self.fallback.scorer = fallback_scorer(rule)  # current or previous when it runs

    def get(self) -> tuple[Scorer, str]:
        return self.current.scorer, self.current.id

    def load(self, path: str | Path | None = None) -> bool:
        """Validate and swap in ``path`` (default: the configured one). False = kept the running
        one."""
        p = Path(path) if path is not None else self.path
        if not p.exists() and path is None and not self.configured_path:
            note = f"no model file at {p}: deciding with the {self.rule!r} rule"
            if self.current.source == "fallback":
                self.current.note = note
            log.warning(note)
            return self.current.source == "fallback"
        try:
            try:
                data = p.read_bytes()
            except OSError as exc:
                raise ModelRejected(f"cannot read: {exc.strerror}") from None
            sha = hashlib.sha256(data).hexdigest()
            if self.current.sha256 == sha and str(self.current.path) == str(p):
                return True  # unchanged
            if sha in self.rolled_back:
                raise ModelRejected(
                    f"sha256 {sha[:16]}... was rolled back on this node after it failed; "
                    "a different model file is loaded"
                )
            scorer, meta = validate(data, self.grid, _expected_sha(p, self.sha256))
        except ModelRejected as exc:
            self.loads_failed += 1
            self.last_error = {"path": str(p), "reason": str(exc), "time": time.time()}
            log.error(
                "model rejected, keeping the running one",
                extra={"path": str(p), "reason": str(exc), "running": self.current.id},
            )
            return False
        self.previous = self.current
        self.current = Loaded(scorer, f"sha256:{sha[:12]}", "onnx", str(p), sha, meta)
        self.loads_ok += 1
        log.info("model loaded", extra={"path": str(p), "model": self.current.id})
        return True

    def rollback(self, reason: str) -> bool:
        if self.previous is None:
            target = self.fallback if self.current is not self.fallback else None
        else:
            target = self.previous
        if target is None:
            return False
        log.error(
            "rolling back the model",
            extra={"from": self.current.id, "to": target.id, "reason": reason},
        )
        self.last_error = {
            "path": self.current.path,
            "reason": f"rolled back: {reason}",
            "time": time.time(),
        }
        bad = self.current
        self.current, self.previous = target, None
        if bad.sha256 is not None:
            self.rolled_back.add(bad.sha256)
            self._save_rolled_back()
        for listener in self.on_rollback:
            listener(bad, target, reason)
        return True

    def status(self) -> dict:
        return {
            "current": self.current.describe(),
            "previous": self.previous.id if self.previous else None,
            "configured_path": str(self.path),
            "rule": self.rule,
            "last_error": self.last_error,
            "loads_ok": self.loads_ok,
            "loads_failed": self.loads_failed,
            "rolled_back_sha256": sorted(self.rolled_back),
        }

    def ready_note(self) -> str:
        c = self.current
        if c.source == "fallback":
            return c.note or f"fallback: the {self.rule!r} rule"
        return f"{c.id} from {c.path}"
