"""``faasrm trainer serve``: the cluster's trainer service (one per cluster; aiohttp owns it).

Every endpoint but ``/healthz`` and ``/metrics`` needs ``Authorization: Bearer <token>`` (401
otherwise): trajectories and models are the cluster's data. Off the loopback interface the
service speaks https (``tls_cert_file``/``tls_key_file``; the nodes verify it with ``[shipper]
ca_file``); plain http there is refused unless ``allow_plaintext`` says otherwise, since the token
would cross the network in clear.

* ``POST /v1/trajectories``: msgpack ``{schema_version, node_id, seq, records: [...]}`` (records
  as in ``sidecar.core.record``). 401 without the token, 413 over ``max_body_bytes``, 400 with a
  reason when malformed, 422 for an unknown schema or record version. 200 ``{"stored": true}``
  once the batch is committed to disk (sqlite, WAL, ``synchronous=FULL``); a batch whose
  ``(node_id, seq)`` was stored before is acknowledged with ``{"stored": false, "duplicate":
  true}`` and not stored again. Bodies are decoded and validated in ``ingest_workers`` processes
  (msgpack holds the GIL for the whole decode, about half a second for 15,000 records: on the
  loop or in a thread that would stall every other request); a worker that dies is replaced and
  its batch answered 503 (nothing stored, the node resends it).
* ``GET /v1/models/latest[?wait=S]``: the latest promoted ONNX (``ETag``, ``X-Model-Version``,
  ``X-Model-Sha256``). With ``If-None-Match`` equal to the current ETag it long-polls up to ``S``
  seconds and answers as soon as a newer version is promoted, else 304. 404 while there is none.
* ``GET /v1/models`` (versions), ``/v1/models/{version}`` (ONNX), ``/v1/models/{version}/meta``.
* ``POST /v1/models``: msgpack ``{onnx, metadata?, evaluation?, checkpoint?, sha256?}``: publish a
  model (offline ``faasrm train`` runs, operators, tests). The registry runs the nodes' own checks
  on it (``sidecar.models.validate`` on ``grid``: onnxruntime load, ``rows`` -> ``scores``,
  feature version and schema hash, grid, finite scores on probe rows): 422 with the reason for a
  model no node could run, so the latest version is always usable.
* ``GET /healthz``, ``/metrics`` (``faasrm_trainer_*``), ``/debug/learner``.

The online learner (``training.online``) runs in its own cleanup context on a worker thread.
Lifecycle: ``READY=1`` once listening, ``WATCHDOG=1`` from an event-loop task (a blocked loop
trips the watchdog), ``STOPPING=1`` when shutdown begins. JSON logs on stderr.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.aiohttp import make_aiohttp_handler

from sidecar.config import ConfigError, is_loopback, load_tree, tls_client_context
from sidecar.core.grid import ResourceGrid
from sidecar.core.policy import OnnxScorer
from sidecar.core.record import (
    NODE_ID_RULE,
    SCHEMA_VERSION,
    RecordError,
    check_batch,
    is_node_id,
)
from sidecar.models import ModelRejected, probe_rows, validate
from sidecar.process import (
    Notifier,
    bearer_matches,
    json_response,
    read_limited,
    setup_logging,
    start_site,
)
from sidecar.shipper import bearer
from sidecar.units import MB
from training.registry import Registry, TrajectoryStore

log = logging.getLogger("faasrm.trainer")
disable_created_metrics()


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class LearnerConfig:
    enabled: bool = True
    """Run online PPO updates on accepted trajectories."""
    interval_s: float = 30.0
    """How often the learner checks for enough new data."""
    min_records: int = 512
    """New rewarded records needed before an update."""
    window_records: int = 8192
    """The newest this many records form an update's batch."""
    update_epochs: int = 4
    """PPO epochs over the batch."""
    num_minibatches: int = 4
    """Mini-batches per epoch."""
    learning_rate: float = 1e-4
    """Adam learning rate (small: the update starts from the running policy)."""
    clip_coef: float = 0.2
    """PPO surrogate clipping coefficient."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Gradient norm clip."""
    seed: int = 1
    """Seed of torch and of the mini-batch shuffles."""
    init_checkpoint: str = ""
    """Agent checkpoint to start from when the registry has no version with one."""


@dataclass(frozen=True)
class GateConfig:
    preset: str = "sample"
    """Simulator preset of the held-out evaluation (sample or small: fast)."""
    seed: int = 12345
    """Fixed workload seed of the held-out evaluation (never used for training)."""
    min_gain: float = 0.0
    """The candidate's mean RFET must beat the running model's, ``rule``'s and ``smallest``'s
    by more than this: the upper bound of the 95% paired interval of each difference (candidate
    minus other) must lie below -min_gain (0: wholly below zero). Never negative: a ratchet."""
    max_failure_increase: int = 0
    """OOM failures the candidate may have beyond the fewest of the running model, rule and
    smallest in the simulator evaluation."""
    real_window: int = 2048
    """Recent real records the real-data check replays."""
    real_max_increase: float = 0.01
    """Allowed increase of predicted slowdown / failure rates on recent real records."""
    slowdown_rfet: float = 1.2
    """RFET above which a real invocation counts as slowed down."""


@dataclass(frozen=True)
class TrainerConfig:
    host: str = "127.0.0.1"
    """Listen address (anything but loopback needs TLS, or allow_plaintext)."""
    port: int = 9480
    """Listen port (0 = any free port)."""
    tls_cert_file: str = ""
    """PEM certificate (chain) to serve https with (with tls_key_file; empty = plain http)."""
    tls_key_file: str = ""
    """PEM private key of tls_cert_file."""
    allow_plaintext: bool = False
    """Serve plain http on a non-loopback host: the token and the trajectories then cross the
    network unencrypted (a trusted private network only)."""
    token: str = ""
    """Bearer token of every endpoint but /healthz and /metrics (prefer token_file or
    $FAASRM_TRAINER_TOKEN)."""
    token_file: str = ""
    """File holding the bearer token."""
    data_dir: str = "/var/lib/faasrm-trainer"
    """Trajectory store, model registry and candidates."""
    max_body_bytes: int = 16 * MB
    """Largest trajectory batch body (413 beyond)."""
    max_model_bytes: int = 64 * MB
    """Largest published model (ONNX + checkpoint)."""
    max_records_per_batch: int = 50_000
    """Most records in one batch."""
    ingest_workers: int = 1
    """Processes that decode and validate batches off the event loop (2+ on a trainer host with
    idle cores; 0 = on the event loop, which then stalls /healthz and the long-polls for as long
    as a large batch takes)."""
    long_poll_max_s: float = 60.0
    """Upper bound of ?wait= on /v1/models/latest."""
    log_level: str = "info"
    """debug, info, warning or error."""
    grid: ResourceGrid = field(default_factory=ResourceGrid)
    """The nodes' action grid (records on another grid are stored but not learned from)."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def resolve_token(self) -> str:
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"token_file {self.token_file}: {exc.strerror}") from None
        return self.token or os.environ.get("FAASRM_TRAINER_TOKEN", "")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server's TLS context from tls_cert_file/tls_key_file; None for plain http."""
        if not (self.tls_cert_file or self.tls_key_file):
            return None
        if not (self.tls_cert_file and self.tls_key_file):
            raise ConfigError("tls_cert_file and tls_key_file go together")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls_cert_file {self.tls_cert_file} / tls_key_file {self.tls_key_file}: {exc}"
            ) from None
        return ctx


REMOVED_KEYS = {
    "gate.max_rfet_ratio": "the gate promotes only a candidate whose mean RFET beats the running "
    "model's, rule's and smallest's, with a 95% paired interval; set gate.min_gain instead "
    "(0.0: any gain the interval shows)",
    "gate.max_slowdown_increase": "the candidate's share of RFET > 1.2 in the simulator may not "
    "exceed the running model's; delete the key",
}
"""Keys an older trainer.toml may still set, and what replaced them."""


MIN_MODEL_BYTES = MB
"""The smallest ``max_model_bytes``: a model with its checkpoint is tens of KB, so a smaller
bound is a unit mistake that would refuse every publish."""

POSITIVE_KEYS = {
    "learner": (
        ("window_records", 1, False),
        ("update_epochs", 1, False),
        ("num_minibatches", 1, False),
        ("learning_rate", 0, True),
        ("clip_coef", 0, True),
        ("max_grad_norm", 0, True),
        ("ent_coef", 0, False),
        ("vf_coef", 0, False),
    ),
    "gate": (
        ("real_window", 1, False),
        ("max_failure_increase", 0, False),
        ("real_max_increase", 0, False),
        ("slowdown_rfet", 1, False),
    ),
}
"""(key, bound, strict) of the learner's and the gate's numbers: each must be above (strict) or
at least its bound. A window of 0 would be every stored record ([-0:]), 0 epochs or mini-batches
no update, and an RFET bound below 1 counts an invocation faster than its baseline as slowed."""


def load_config(path: str | None, overrides: dict | None = None) -> TrainerConfig:
    cfg = load_tree(TrainerConfig, path, overrides, REMOVED_KEYS)
    problems = []
    if not 0 <= cfg.port <= 65535:
        problems.append(f"port {cfg.port} outside 0..65535")
    if not 0 <= cfg.ingest_workers <= 64:
        problems.append("ingest_workers must be 0..64")
    if cfg.max_body_bytes < 1024 or cfg.max_records_per_batch < 1:
        problems.append("max_body_bytes must be >= 1024 and max_records_per_batch >= 1")
    if cfg.max_model_bytes < MIN_MODEL_BYTES:
        problems.append(f"max_model_bytes {cfg.max_model_bytes} must be >= {MIN_MODEL_BYTES}")
    if cfg.long_poll_max_s <= 0:
        problems.append(f"long_poll_max_s {cfg.long_poll_max_s} must be > 0")
    if cfg.learner.interval_s <= 0 or cfg.learner.min_records < 1:
        problems.append("learner.interval_s must be > 0 and learner.min_records >= 1")
    for section, bounds in POSITIVE_KEYS.items():
        for name, low, strict in bounds:
            v = getattr(getattr(cfg, section), name)
            if v < low or (strict and v == low):
                problems.append(f"{section}.{name} {v} must be {'>' if strict else '>='} {low}")
    if cfg.gate.preset not in ("sample", "small", "paper"):
        problems.append(f"gate.preset {cfg.gate.preset!r} is not sample, small or paper")
    if cfg.gate.min_gain < 0:
        problems.append(
            "gate.min_gain must be >= 0 (below 0 the gate would promote a candidate worse than "
            "the running model)"
        )
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        problems.append(f"log_level {cfg.log_level!r} is not debug, info, warning or error")
    try:
        cfg.grid.n  # noqa: B018 (a grid that cannot be built raises here)
    except ValueError as exc:
        problems.append(f"grid: {exc}")
    if not cfg.resolve_token():
        problems.append("no token: set token_file, token or $FAASRM_TRAINER_TOKEN")
    try:
        tls = cfg.ssl_context() is not None
    except ConfigError as exc:
        problems.append(str(exc))
        tls = True  # refused above already
    if not tls and not is_loopback(cfg.host) and not cfg.allow_plaintext:
        problems.append(
            f"host {cfg.host!r} is not a loopback address and no TLS is configured: set "
            "tls_cert_file and tls_key_file (the nodes verify them with [shipper] ca_file), or "
            "allow_plaintext = true to send the token and trajectories unencrypted"
        )
    if problems:
        raise ConfigError(f"{path or 'config'}: {'; '.join(problems)}")
    return cfg


# ------------------------------------------------------------------------------------ metrics
REJECT_REASONS = ("unauthorized", "too_large", "malformed", "schema_version")


class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.transitions = Counter(
            "faasrm_trainer_ingest_transitions_total", "Trajectory records stored", registry=r
        )
        self.batches = Counter(
            "faasrm_trainer_ingest_batches_total",
            "Trajectory batches answered 2xx",
            ["result"],
            registry=r,
        )
        for res in ("stored", "duplicate"):
            self.batches.labels(res)
        self.rejected = Counter(
            "faasrm_trainer_rejected_batches_total",
            "Trajectory batches refused",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.ingest_errors = Counter(
            "faasrm_trainer_ingest_errors_total",
            "Valid trajectory batches the trainer failed to store (answered 500, resent later)",
            registry=r,
        )
        self.ingest_latency = Histogram(
            "faasrm_trainer_ingest_duration_seconds",
            "Validation + durable commit of one batch",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.model_version = Gauge(
            "faasrm_trainer_model_version", "Latest promoted model version (0: none)", registry=r
        )
        self.model_versions = Gauge(
            "faasrm_trainer_model_versions", "Model versions in the registry", registry=r
        )
        self.updates = Counter(
            "faasrm_trainer_updates_total", "Online learning updates", ["result"], registry=r
        )
        for res in ("promoted", "rejected", "skipped", "error"):
            self.updates.labels(res)
        self.gate = Counter(
            "faasrm_trainer_gate_checks_total",
            "Promotion gate checks",
            ["check", "result"],
            registry=r,
        )
        for check in ("sim", "real"):
            for res in ("pass", "fail"):
                self.gate.labels(check, res)
        self.update_duration = Histogram(
            "faasrm_trainer_update_duration_seconds",
            "One update: PPO epochs, export and gate",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.long_polls = Gauge("faasrm_trainer_long_polls", "Model long-polls waiting", registry=r)


# ------------------------------------------------------------------------------------ batches
class BatchError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)  # both in args: it pickles (validator processes)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return self.reason

    @property
    def label(self) -> str:
        return "schema_version" if self.status == 422 else "malformed"


@dataclass
class Batch:
    node_id: str
    seq: int
    n: int
    rewarded: int


_ENVELOPE = {"schema_version", "node_id", "seq", "records"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def decode_batch(body: bytes, max_records: int) -> Batch:
    """Validate a trajectory batch completely; raises BatchError(400 | 422, reason).

    The body is decoded once (arrays as tuples: cheaper than lists); the envelope is checked
    here, the records by ``sidecar.core.record.check_batch``.
    """
    if not body:
        raise BatchError(400, "empty body: expected a msgpack map")
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0, use_list=False)
    except Exception as exc:  # msgpack raises several types (ExtraData, StackError, ...)
        reason = f"body is not one valid msgpack object: {type(exc).__name__}"
        raise BatchError(400, reason) from None
    if not isinstance(obj, dict):
        raise BatchError(400, "body must be a msgpack map")
    if "schema_version" not in obj:
        raise BatchError(400, "'schema_version' is required")
    sv = obj["schema_version"]
    if not _is_int(sv):
        raise BatchError(400, "'schema_version' must be an integer")
    if sv != SCHEMA_VERSION:
        raise BatchError(422, f"unknown schema_version {sv}; this trainer reads {SCHEMA_VERSION}")
    if set(obj) != _ENVELOPE:
        extra, missing = sorted(map(str, set(obj) - _ENVELOPE)), sorted(_ENVELOPE - set(obj))
        raise BatchError(400, f"envelope keys: missing {missing}, unknown {extra}")
    node, seq, records = obj["node_id"], obj["seq"], obj["records"]
    if not is_node_id(node):
        raise BatchError(400, f"'node_id' must be {NODE_ID_RULE}")
    if not _is_int(seq) or not 0 <= seq < 2**63:
        raise BatchError(400, "'seq' must be an integer in 0..2^63-1")
    if type(records) is not tuple or not records:
        raise BatchError(400, "'records' must be a non-empty array")
    if len(records) > max_records:
        raise BatchError(400, f"{len(records)} records in one batch, at most {max_records}")
    try:
        rewarded = check_batch(records, node)
    except RecordError as exc:
        raise BatchError(422 if exc.unknown_version else 400, exc.reason) from None
    return Batch(node, seq, len(records), rewarded)


# ------------------------------------------------------------------------------------ state
class Service:
    """Everything the handlers share (one AppKey)."""

    def __init__(self, cfg: TrainerConfig, token: str) -> None:
        self.cfg = cfg
        self.token = token
        data = Path(cfg.data_dir)
        self.store = TrajectoryStore(data / "trajectories.sqlite")
        self.registry = Registry(data / "models", cfg.grid)
        self.metrics = TrainerMetrics()
        self.db = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="faasrm-db")
        self.validators: concurrent.futures.ProcessPoolExecutor | None = None
        self.changed = asyncio.Event()
        self.ready = asyncio.Event()
        """Set once listening (after READY=1): the watchdog pings start then."""
        self.closing = False
        self.learner: Any = None
        self.started = time.time()
        self._sync_model_metrics()

    def _sync_model_metrics(self) -> None:
        latest = self.registry.latest()
        self.metrics.model_version.set(latest.version if latest else 0)
        self.metrics.model_versions.set(len(self.registry.versions()))

    def promoted(self) -> None:
        """Wake every long-poll (call on the event loop)."""
        self._sync_model_metrics()
        ev, self.changed = self.changed, asyncio.Event()
        ev.set()

    def authorized(self, request: web.Request) -> bool:
        return bearer_matches(request, self.token)

    def start_validators(self) -> None:
        """The ``ingest_workers`` processes; none with 0. Spawned (they never inherit the loop's
        threads or sockets) as the trainer's own children that die with it: a SIGKILLed trainer
        must not leave validators (or a forkserver) behind."""
        if self.cfg.ingest_workers > 0:
            import multiprocessing

            self.validators = concurrent.futures.ProcessPoolExecutor(
                self.cfg.ingest_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_die_with_parent,
            )

    async def validate(self, body: bytes) -> Batch:
        """The decoded batch or BatchError; BrokenProcessPool when a worker died meanwhile (the
        workers are replaced first, so the next batch goes to new ones)."""
        pool = self.validators
        if pool is None:
            return decode_batch(body, self.cfg.max_records_per_batch)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                pool, decode_batch, body, self.cfg.max_records_per_batch
            )
        except concurrent.futures.process.BrokenProcessPool:
            if self.validators is pool:  # the first request to notice replaces them
                log.error("a validator process died; starting new ones")
                pool.shutdown(wait=False, cancel_futures=True)
                self.start_validators()
            raise

    def close(self) -> None:
        if self.validators is not None:
            self.validators.shutdown(wait=True, cancel_futures=True)
        self.db.shutdown(wait=True)
        self.store.close()


SERVICE = web.AppKey("service", Service)
NOTIFIER = web.AppKey("notifier", Notifier)
WATCHDOG_TASK = web.AppKey("watchdog_task", asyncio.Task)
LEARN_TASK = web.AppKey("learn_task", asyncio.Task)


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


# ------------------------------------------------------------------------------------ handlers
OPEN_PATHS = frozenset({"/healthz", "/metrics"})
"""The only endpoints answered without the token (probes and Prometheus)."""


@web.middleware
async def _require_token(request: web.Request, handler: Any) -> web.StreamResponse:
    svc = request.app[SERVICE]
    if request.path not in OPEN_PATHS and not svc.authorized(request):
        if request.method == "POST":  # a node or a publisher with a wrong token (an alert)
            svc.metrics.rejected.labels("unauthorized").inc()
        return _error(401, "missing or wrong bearer token")
    return await handler(request)


async def post_trajectories(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    m = svc.metrics
    t0 = time.perf_counter()
    body = await read_limited(request.content, request.content_length, svc.cfg.max_body_bytes)
    if body is None:
        m.rejected.labels("too_large").inc()
        return _error(413, f"body larger than {svc.cfg.max_body_bytes} bytes")
    try:
        batch = await svc.validate(body)
    except BatchError as exc:
        m.rejected.labels(exc.label).inc()
        log.info("batch refused", extra={"status": exc.status, "reason": exc.reason})
        return _error(exc.status, exc.reason)
    except concurrent.futures.process.BrokenProcessPool:  # logged when the workers are replaced
        return _error(503, "the validator process died (a new one is starting): resend the batch")
    loop = asyncio.get_running_loop()
    try:
        stored = await loop.run_in_executor(
            svc.db, svc.store.add, batch.node_id, batch.seq, batch.n, batch.rewarded, body
        )
    except (sqlite3.Error, OSError) as exc:  # nothing stored: the node resends the same seq
        m.ingest_errors.inc()
        log.error("cannot store a batch", extra={"node": batch.node_id, "reason": str(exc)})
        return _error(500, f"cannot store the batch: {exc}")
    m.ingest_latency.observe(time.perf_counter() - t0)
    if stored:
        m.batches.labels("stored").inc()
        m.transitions.inc(batch.n)
    else:
        m.batches.labels("duplicate").inc()
        log.info("duplicate batch acknowledged", extra={"node": batch.node_id, "seq": batch.seq})
    return web.json_response(
        {"stored": stored, "duplicate": not stored, "records": batch.n, "seq": batch.seq}
    )


def _model_response(v: Any) -> web.Response:
    return web.Response(
        body=v.onnx_bytes(),
        content_type="application/octet-stream",
        headers={
            "ETag": v.etag,
            "X-Model-Version": str(v.version),
            "X-Model-Sha256": v.sha256,
            "Cache-Control": "no-cache",
        },
    )


async def get_latest(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    try:
        wait = float(request.query.get("wait", "0"))
        if not math.isfinite(wait) or wait < 0:
            raise ValueError
    except ValueError:
        return _error(400, "'wait' must be a number of seconds >= 0")
    wait = min(wait, svc.cfg.long_poll_max_s)
    inm = request.headers.get("If-None-Match")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    svc.metrics.long_polls.inc()
    try:
        while True:
            v = svc.registry.latest()
            if v is not None and v.etag != inm:
                return _model_response(v)
            remaining = deadline - loop.time()
            if remaining <= 0 or svc.closing:
                if v is None:
                    return _error(404, "no model promoted yet")
                return web.Response(status=304, headers={"ETag": v.etag})
            ev = svc.changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(ev.wait(), remaining)
    finally:
        svc.metrics.long_polls.dec()


def _version_arg(request: web.Request) -> int | None:
    try:
        return int(request.match_info["version"])
    except ValueError:
        return None


async def get_version(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    n = _version_arg(request)
    v = svc.registry.get(n) if n is not None else None
    if v is None:
        return _error(404, f"no model version {request.match_info['version']!r}")
    return _model_response(v)


async def get_version_meta(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    n = _version_arg(request)
    v = svc.registry.get(n) if n is not None else None
    if v is None:
        return _error(404, f"no model version {request.match_info['version']!r}")
    return json_response(v.meta)


async def list_models(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    latest = svc.registry.latest()
    return web.json_response(
        {"latest": latest.version if latest else None, "versions": svc.registry.versions()}
    )


def check_checkpoint(data: bytes, scorer: OnnxScorer, grid: ResourceGrid) -> None:
    """Raise unless ``data`` is a checkpoint whose ``agent`` loads into the learner's agent
    (every online update starts from it), without running any code it carries, and whose actor
    scores the probe rows as the published model (``scorer``) does: the learner weighs each
    record by the actor's probability of its action against the one the node recorded under the
    model, so a checkpoint of another policy would make every importance ratio meaningless."""
    import torch

    from training.ppo import Agent, load_checkpoint

    agent = Agent()
    agent.load_state_dict(load_checkpoint(data)["agent"])
    with torch.no_grad():
        for rows in probe_rows(grid):
            want = scorer.scores(rows)
            got = agent.scores(torch.from_numpy(rows)).numpy()
            gap = float(np.max(np.abs(got - want) / (1.0 + np.abs(want))))
            if not gap <= 1e-4:
                raise ValueError(
                    f"its actor scores differently from the model (relative gap {gap:.3g}): "
                    "online updates would start from a policy the nodes never ran"
                )


async def post_model(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    body = await read_limited(request.content, request.content_length, svc.cfg.max_model_bytes)
    if body is None:
        return _error(413, f"model larger than {svc.cfg.max_model_bytes} bytes")
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:
        return _error(400, f"body is not valid msgpack: {type(exc).__name__}")
    if not isinstance(obj, dict) or not isinstance(obj.get("onnx"), bytes) or not obj["onnx"]:
        return _error(400, "expected a map with 'onnx' (bytes)")
    unknown = set(obj) - {"onnx", "metadata", "evaluation", "checkpoint", "sha256", "source"}
    if unknown:
        return _error(400, f"unknown keys {sorted(unknown)}")
    sha = hashlib.sha256(obj["onnx"]).hexdigest()
    if obj.get("sha256") and obj["sha256"] != sha:
        return _error(400, "sha256 does not match the onnx bytes")
    for key in ("metadata", "evaluation"):
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            return _error(400, f"'{key}' must be a map")
        try:  # as the registry writes it into meta.json: bytes keys (msgpack allows them) cannot
            json.dumps(obj.get(key), default=str)
        except (TypeError, ValueError, RecursionError) as exc:
            return _error(400, f"'{key}' cannot be stored as JSON: {exc}")
    ckpt = obj.get("checkpoint")
    if ckpt is not None and not isinstance(ckpt, bytes):
        return _error(400, "'checkpoint' must be bytes")
    loop = asyncio.get_running_loop()
    try:
        scorer, _ = await loop.run_in_executor(svc.db, validate, obj["onnx"], svc.cfg.grid, None)
    except ModelRejected as exc:
        log.warning("published model refused", extra={"sha256": sha, "reason": str(exc)})
        return _error(422, f"no node could run this model: {exc}")
    if ckpt is not None:
        try:
            await loop.run_in_executor(svc.db, check_checkpoint, ckpt, scorer, svc.cfg.grid)
        except Exception as exc:  # noqa: BLE001 (torch raises many types for a bad file)
            reason = f"{type(exc).__name__}: {str(exc)[:300]}"
            return _error(422, f"the checkpoint is not the model's agent: {reason}")
    try:
        v = await loop.run_in_executor(
            svc.db,
            lambda: svc.registry.add(
                obj["onnx"],
                obj.get("metadata"),
                obj.get("evaluation"),
                ckpt,
                str(obj.get("source") or "publish"),
            ),
        )
    except ModelRejected as exc:
        log.warning("published model refused", extra={"sha256": sha, "reason": str(exc)})
        return _error(422, f"no node could run this model: {exc}")
    svc.promoted()
    log.info("model published", extra={"version": v.version, "sha256": v.sha256})
    return web.json_response({"version": v.version, "sha256": v.sha256})


async def healthz(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    latest = svc.registry.latest()
    return web.json_response(
        {
            "status": "ok",
            "model_version": latest.version if latest else None,
            "uptime_s": round(time.time() - svc.started, 3),
            **svc.store.counts(),
        }
    )


async def debug_learner(request: web.Request) -> web.Response:
    svc = request.app[SERVICE]
    status = svc.learner.status() if svc.learner is not None else {"enabled": False}
    return json_response(status)


# ------------------------------------------------------------------------------------ contexts
def _warm() -> int:
    return os.getpid()


def _die_with_parent() -> None:
    """In a validator process: SIGKILL when the trainer dies (PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


async def _service_ctx(app: web.Application) -> AsyncIterator[None]:
    svc = app[SERVICE]
    svc.start_validators()
    if svc.validators is not None:
        # start them now (imports take a moment) rather than on the first batch
        await asyncio.gather(
            *(
                asyncio.get_running_loop().run_in_executor(svc.validators, _warm)
                for _ in range(svc.cfg.ingest_workers)
            )
        )
    yield
    svc = app[SERVICE]
    svc.close()


async def _watchdog_loop(notifier: Notifier, ready: asyncio.Event) -> None:
    interval = notifier.watchdog_interval_s or 1.0
    await ready.wait()
    while True:
        notifier.watchdog()
        await asyncio.sleep(min(interval, 1.0))


async def _watchdog_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        _watchdog_loop(app[NOTIFIER], app[SERVICE].ready), name="faasrm-watchdog"
    )
    app[WATCHDOG_TASK] = task
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _learner_ctx(app: web.Application) -> AsyncIterator[None]:
    svc = app[SERVICE]
    if not svc.cfg.learner.enabled:
        yield
        return
    from training.online import Learner, learn_loop

    svc.learner = Learner(svc.cfg, svc.store, svc.registry, svc.metrics)
    task = asyncio.create_task(learn_loop(svc), name="faasrm-learner")
    app[LEARN_TASK] = task
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    svc.learner.close()


async def _on_shutdown(app: web.Application) -> None:
    app[NOTIFIER].stopping()
    svc = app[SERVICE]
    svc.closing = True
    svc.promoted()  # long-polls answer now instead of holding the shutdown
    log.info("stopping")


def build_app(cfg: TrainerConfig, notifier: Notifier | None = None) -> web.Application:
    app = web.Application(
        client_max_size=max(cfg.max_body_bytes, cfg.max_model_bytes) + 1,
        middlewares=[_require_token],
    )
    app[SERVICE] = Service(cfg, cfg.resolve_token())
    app[NOTIFIER] = notifier or Notifier.from_env()
    app.cleanup_ctx.append(_service_ctx)
    app.cleanup_ctx.append(_watchdog_ctx)
    app.cleanup_ctx.append(_learner_ctx)
    app.on_shutdown.append(_on_shutdown)
    r = app.router
    r.add_post("/v1/trajectories", post_trajectories)
    r.add_get("/v1/models", list_models)
    r.add_post("/v1/models", post_model)
    r.add_get("/v1/models/latest", get_latest)
    r.add_get("/v1/models/{version}", get_version)
    r.add_get("/v1/models/{version}/meta", get_version_meta)
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", make_aiohttp_handler(app[SERVICE].metrics.registry))
    r.add_get("/debug/learner", debug_learner)
    return app


async def serve(cfg: TrainerConfig, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set): READY=1 once listening."""
    app = build_app(cfg)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0, handle_signals=False)
    await runner.setup()
    tls = cfg.ssl_context()
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=tls)
    try:
        await start_site(site, f"port {cfg.port} on host {cfg.host!r}")
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)  # not in a thread (tests)
        port = runner.addresses[0][1] if runner.addresses else cfg.port
        scheme = "https" if tls else "http"
        app[NOTIFIER].send(
            f"READY=1\nSTATUS=listening on {scheme}://{cfg.host}:{port}\nMAINPID={os.getpid()}"
        )
        app[SERVICE].ready.set()
        log.info(
            "trainer listening",
            extra={"host": cfg.host, "port": port, "scheme": scheme, "data_dir": cfg.data_dir},
        )
        await stop.wait()
    finally:
        await runner.cleanup()


def run(cfg: TrainerConfig) -> int:
    setup_logging(cfg.log_level)
    asyncio.run(serve(cfg))
    return 0


# ------------------------------------------------------------------------------------ client
class TrainerError(ValueError):
    """The trainer refused a request: its HTTP ``status`` and the reason it gave."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


def call_trainer(
    url: str, token: str, body: bytes | None = None, ca_file: str = "", timeout_s: float = 30.0
) -> Any:
    """GET ``url`` (or POST a msgpack ``body``) with the bearer token, an https url verified
    against ``ca_file`` (empty = the system's CAs); its JSON answer, or TrainerError."""
    import urllib.error
    import urllib.request

    headers = bearer(token)
    if body is not None:
        headers["Content-Type"] = "application/msgpack"
    req = urllib.request.Request(url, data=body, headers=headers)
    ctx = tls_client_context(ca_file, "ca_file") if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        try:
            reason = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            reason = text[:500] or exc.reason
        raise TrainerError(exc.code, reason) from None


def publish(
    url: str,
    token: str,
    onnx: str | Path | bytes,
    checkpoint: str | Path | bytes | None = None,
    evaluation: dict | None = None,
    source: str = "publish",
    timeout_s: float = 30.0,
    ca_file: str = "",
) -> dict:
    """POST an exported model (and its ``<path>.json`` metadata when present) to the registry;
    TrainerError (422 with the reason) for a model no node could run."""
    metadata: dict = {}
    if not isinstance(onnx, bytes):
        side = Path(str(onnx) + ".json")
        if side.exists():
            metadata = json.loads(side.read_text())
        onnx = Path(onnx).read_bytes()
    if checkpoint is not None and not isinstance(checkpoint, bytes):
        checkpoint = Path(checkpoint).read_bytes()
    body = msgpack.packb(
        {
            "onnx": onnx,
            "metadata": metadata,
            "evaluation": evaluation or {},
            "checkpoint": checkpoint,
            "source": source,
        },
        use_bin_type=True,
    )
    return call_trainer(url.rstrip("/") + "/v1/models", token, body, ca_file, timeout_s)
