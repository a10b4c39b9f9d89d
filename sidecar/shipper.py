"""Ship the trajectory spool to the trainer: batches with retry, backoff and jitter, exactly once.

Exactly once = at-least-once delivery + the trainer's idempotency on ``(node_id, seq)``:

1. A batch is planned from the acknowledged spool position (segment, byte offset): up to
   ``batch_records`` whole records, never more than ``max_batch_bytes``, all carrying one node
   id, which its envelope names (records spooled before the node was renamed keep the old one).
   Its range and its ``seq`` (one more than the last) are written to ``state_file`` (fsynced)
   *before* it is sent.
2. It is POSTed until the trainer answers. 2xx (stored, or a duplicate of a batch it already
   stored): the position moves past the batch and ``seq`` advances, persisted again.
3. After a crash anywhere in between, the same bytes go out again under the same ``seq``: the
   trainer stores them once. A seq number is never reused for other records: a node without
   state (first start, or its state file lost) starts at the current time in microseconds.

The record bytes are sent as they sit in the spool (no decode/re-encode). Shipped segments other
than the one being written are deleted. Errors and 5xx are retried with exponential backoff and
full jitter (``backoff_initial_s`` doubling up to ``backoff_max_s``); 401 too (a token being
rotated), and 422 (a trainer older than this node's record version: wait for its upgrade). 413
and 400 halve the batch under the same seq (nothing was stored) until a single record is left;
a single record the trainer refuses is dropped, counted and logged, so one bad record can
neither stall the node nor take good records with it.
If the spool dropped the segment a planned batch came from (it was full), the batch is gone: the
spool counted those records as dropped; shipping resumes at the oldest segment left.

Every request to the trainer (these and the model poller's) carries the bearer token and, for an
https url, verifies the trainer's certificate against ``[shipper] ca_file`` (``trainer_session``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from sidecar.config import ShipperConfig
from sidecar.core.record import SCHEMA_VERSION
from sidecar.durable import write_atomic
from sidecar.spool import Spool

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("faasrm.shipper")
_PREFIX, _SUFFIX = "seg-", ".msgpack"


def _seg_no(path: Path) -> int:
    return int(path.name[len(_PREFIX) : -len(_SUFFIX)])


def bearer(token: str) -> dict[str, str]:
    """The trainer's auth header (none without a token: the trainer then answers 401)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def trainer_session(ssl_context: ssl.SSLContext | None) -> aiohttp.ClientSession:
    """The aiohttp client session of the shipper and the model poller: https verified against
    ``ssl_context`` (None: aiohttp's default, the system's CAs)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context or True))


def jittered_backoff(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": uniform in [cap/2, cap], cap doubling per
    attempt."""
    cap = min(max_s, initial_s * 2 ** min(attempt, 30))
    return rng.uniform(cap / 2, cap)


def log_retry(
    logger: logging.Logger, message: str, reason: str | None, attempt: int, delay_s: float
) -> None:
    """Warn on the first failure and every tenth after it: a long outage must not flood the log."""
    if attempt == 1 or attempt % 10 == 0:
        logger.warning(
            message, extra={"reason": reason, "attempt": attempt, "delay_s": round(delay_s, 3)}
        )


@dataclass
class Pending:
    seq: int
    segment: int
    start: int
    end: int
    records: int


def _fresh_seq() -> int:
    """The first seq of a node without shipper state: microseconds since the epoch.

    Above every seq an earlier run of this node can have used (they started from an earlier
    clock reading and add one per batch), so a lost or deleted state file can never make the
    trainer take new records for duplicates of old ones.
    """
    return int(time.time() * 1e6)


@dataclass
class ShipState:
    segment: int = 0
    offset: int = 0
    next_seq: int = field(default_factory=_fresh_seq)
    pending: Pending | None = None


class Shipper:
    def __init__(
        self,
        spool: Spool,
        cfg: ShipperConfig,
        token: str,
        metrics: Any = None,
    ) -> None:
        self.spool = spool
        self.cfg = cfg
        self.token = token
        self.metrics = metrics
        self.state_path = Path(cfg.state_file)
        self.state = self._load()
        spool.shipped = (self.state.segment, self.state.offset)
        self.shipped_records = 0
        self.shipped_batches = 0
        self.retries = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._rng = random.Random()

    # ------------------------------------------------------------------------ state
    def _load(self) -> ShipState:
        try:
            raw = json.loads(self.state_path.read_text())
            pending = Pending(**raw["pending"]) if raw.get("pending") else None
            return ShipState(int(raw["segment"]), int(raw["offset"]), int(raw["next_seq"]), pending)
        except FileNotFoundError:
            return ShipState()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # never guess a position: start over from the oldest spooled record under a fresh
            # seq range (the trainer may then hold some of them twice, never lose them)
            log.error(
                "unreadable shipper state; re-shipping the spool under a new seq range",
                extra={"reason": str(exc)},
            )
            return ShipState()

    def _save(self) -> None:
        """Persist the state, and tell the spool what a full spool would not lose."""
        write_atomic(self.state_path, json.dumps(asdict(self.state)).encode())
        self.spool.shipped = (self.state.segment, self.state.offset)

    # ------------------------------------------------------------------------ planning
    def _segments(self) -> list[Path]:
        return self.spool.segments()

    def plan(self) -> Pending | None:
        """The next batch from the acknowledged position (persisted as pending), or None."""
        if self.state.pending is not None:
            return self.state.pending
        while True:
            segs = self._segments()
            if not segs:
                return None
            current = segs[-1]
            seg = next((p for p in segs if _seg_no(p) >= self.state.segment), None)
            if seg is None:
                return None
            if _seg_no(seg) != self.state.segment:
                self.state.segment, self.state.offset = _seg_no(seg), 0
            start, end, n = self._scan(seg, self.state.offset)
            if n:
                self.state.pending = Pending(self.state.next_seq, _seg_no(seg), start, end, n)
                self._save()
                return self.state.pending
            if seg == current:
                return None
            # a finished, fully shipped segment: delete it and go on with the next one
            self.spool.remove(seg)
            nxt = next((p for p in self._segments() if _seg_no(p) > _seg_no(seg)), None)
            self.state.segment, self.state.offset = (_seg_no(nxt) if nxt else _seg_no(seg) + 1), 0
            self._save()

    def _scan(self, path: Path, offset: int) -> tuple[int, int, int]:
        """(start, end, records) of the whole records from ``offset``, within the batch limits and
        all carrying the first one's node (records spooled before a rename keep the old one)."""
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(self.cfg.max_batch_bytes + (1 << 16))
        except FileNotFoundError:
            return offset, offset, 0
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(data)
        end, n, node = 0, 0, None
        budget = self.cfg.max_batch_bytes - 64  # the envelope
        try:
            for obj in unpacker:
                pos = unpacker.tell()
                is_map = isinstance(obj, dict)
                if n and (pos > budget or (is_map and obj.get("node") != node)):
                    break
                end = pos
                if is_map:
                    node = node if n else obj.get("node")
                    n += 1
                if n >= self.cfg.batch_records:
                    break
        except (msgpack.UnpackException, ValueError):
            pass  # a torn tail (crash) or garbage: ship what precedes it
        return offset, offset + end, n

    def body(self, p: Pending) -> bytes:
        with open(self.spool.dir / f"{_PREFIX}{p.segment:020d}{_SUFFIX}", "rb") as fh:
            fh.seek(p.start)
            raw = fh.read(p.end - p.start)
        # keep only the maps (a stray non-map object was skipped when planning); the envelope
        # names the node they carry (one per batch: ``_scan``), not necessarily this node's
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(raw)
        parts, prev, node = [], 0, None
        for obj in unpacker:
            pos = unpacker.tell()
            if isinstance(obj, dict):
                node = node if parts else obj.get("node")
                parts.append(raw[prev:pos])
            prev = pos
        pk = msgpack.Packer(use_bin_type=True)
        head = (
            pk.pack_map_header(4)
            + pk.pack("schema_version")
            + pk.pack(SCHEMA_VERSION)
            + pk.pack("node_id")
            + pk.pack(node)
            + pk.pack("seq")
            + pk.pack(p.seq)
            + pk.pack("records")
            + pk.pack_array_header(len(parts))
        )
        return head + b"".join(parts)

    def acknowledge(self, p: Pending) -> None:
        self.state.segment, self.state.offset = p.segment, p.end
        self.state.next_seq = p.seq + 1
        self.state.pending = None
        self._save()

    def _pending_exists(self, p: Pending) -> bool:
        return (self.spool.dir / f"{_PREFIX}{p.segment:020d}{_SUFFIX}").exists()

    # ------------------------------------------------------------------------ sending
    def backoff_s(self, attempt: int) -> float:
        return jittered_backoff(
            attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng
        )

    def _count(self, result: str, n: int = 0) -> None:
        if self.metrics is not None:
            self.metrics.shipped_batches.labels(result).inc()
            if result in ("stored", "duplicate") and n:
                self.metrics.shipped_records.inc(n)
            if result == "rejected" and n:
                self.metrics.shipper_dropped.inc(n)

    def _failing(self, attempts: int) -> None:
        if self.metrics is not None:
            self.metrics.shipper_failures.set(attempts)

    async def ship_once(self, session: Any) -> str:
        """Plan and send one batch: 'idle', 'shipped', 'split', 'dropped' or 'retry'."""
        p = self.plan()
        if p is None:
            return "idle"
        if not self._pending_exists(p):
            log.warning("the spool dropped a planned batch's segment", extra={"seq": p.seq})
            self.state.pending = None
            self.state.next_seq = p.seq + 1
            self.state.segment, self.state.offset = p.segment + 1, 0
            self._save()
            return "dropped"
        body = self.body(p)
        url = self.cfg.url.rstrip("/") + "/v1/trajectories"
        headers = {**bearer(self.token), "Content-Type": "application/msgpack"}
        import aiohttp

        try:
            async with session.post(
                url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            ) as r:
                status = r.status
                text = (await r.read())[:500].decode("utf-8", "replace")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._count("error")
            return "retry"
        if 200 <= status < 300:
            dup = '"duplicate": true' in text
            self.acknowledge(p)
            self.shipped_batches += 1
            self.shipped_records += p.records
            self.last_error = None
            self._count("duplicate" if dup else "stored", p.records)
            return "shipped"
        self.last_error = f"HTTP {status}: {text[:200]}"
        if status in (400, 413) and p.records > 1:
            # nothing was stored under this seq: re-plan half the batch under the same seq
            # (413: too big; 400: isolate the record the trainer refuses)
            self.state.pending = None
            limit = self.cfg.batch_records
            self.cfg = _replace(self.cfg, batch_records=max(1, p.records // 2))
            try:
                self.plan()
            finally:
                self.cfg = _replace(self.cfg, batch_records=limit)
            return "split"
        if status in (400, 413):
            log.error(
                "trainer refused a record; dropping it",
                extra={"seq": p.seq, "records": p.records, "status": status, "reason": text[:200]},
            )
            self.dropped += p.records
            self._count("rejected", p.records)
            self.acknowledge(p)
            return "dropped"
        self._count("error")
        return "retry"

    async def run(self) -> None:
        attempt = 0
        async with trainer_session(self.cfg.ssl_context()) as session:
            while True:
                try:
                    result = await self.ship_once(session)
                except OSError as exc:  # the spool or the state file: keep trying
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.error("shipper I/O error", extra={"reason": self.last_error})
                    result = "retry"
                if result == "retry":
                    self.retries += 1
                    delay = self.backoff_s(attempt)
                    attempt += 1
                    self._failing(attempt)
                    log_retry(log, "shipping failed, retrying", self.last_error, attempt, delay)
                    await asyncio.sleep(delay)
                    continue
                if attempt:
                    attempt = 0
                    self._failing(0)
                if result == "idle":
                    await asyncio.sleep(self.cfg.interval_s)

    def status(self) -> dict:
        return {
            "url": self.cfg.url,
            "next_seq": self.state.next_seq,
            "position": {"segment": self.state.segment, "offset": self.state.offset},
            "pending": asdict(self.state.pending) if self.state.pending else None,
            "shipped_records": self.shipped_records,
            "shipped_batches": self.shipped_batches,
            "retries": self.retries,
            "dropped_refused": self.dropped,
            "last_error": self.last_error,
        }


def _replace(cfg: ShipperConfig, **kw: Any) -> ShipperConfig:
    import dataclasses

    return dataclasses.replace(cfg, **kw)


from aiohttp import web  # noqa: E402 (the AppKey lives beside its owner)

SHIPPER = web.AppKey("shipper", Shipper)
