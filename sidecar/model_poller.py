"""Follow the trainer's model registry: long-poll, validate, hot-swap, watch, roll back.

``GET /v1/models/latest?wait=S`` with ``If-None-Match`` returns as soon as a newer version is
promoted (304 otherwise). A download larger than ``max_model_bytes`` is refused on its
Content-Length, or as soon as it grows beyond it: a broken trainer cannot make the node hold more.
A download whose sha256 is not its ``X-Model-Sha256`` is refused before it touches the disk (and
fetched again after a backoff). A new model is written atomically to
``model_poller.dir`` as ``v<version>-<sha256[:16]>.onnx`` (so no model overwrites another's file),
its sha256 beside it, and loaded by ``sidecar.models.ModelManager.load``: every check a local
model file gets (sha256, onnxruntime, feature version/schema hash/grid, finite scores on probe
rows). A refused model leaves the running one in place; its ETag is remembered, so it is not
fetched again until a newer version appears.

The swap runs on the event loop, which also makes every decision: a decision sees the old model or
the new one, never a mix. After a swap the poller watches the new model's finished invocations
(``Node.record_observers``): once ``min_invocations`` have run, if more than
``max_slowdown_rate`` of them were slowed down (duration above ``slowdown_rfet`` x baseline) or
failed, it rolls back to the previous model. Whoever rolls a registry model back (this watch, or
the daemon after repeated non-finite decisions: ``ModelManager.on_rollback``), the poller never
adopts that version again. After ``watch_invocations`` the model is confirmed. ``/debug/model``
shows the active registry version and this history.

``<dir>/active.json`` (written atomically after every change) records the registry version the
node runs, the one it would roll back to, the versions rolled back, the rollback watch and the
last ETag seen: a restarted daemon loads the rollback target and then the active version at once
(so a rollback after the restart returns to the version that ran before), resumes the watch of a
model not yet confirmed (with the counts saved at the last clean shutdown, ``close``, or after a
crash those saved when it started: invocations are not written to disk one by one), never takes
a rolled-back version again, and its first poll carries that ETag.
Requests carry the trainer's bearer token and verify its https certificate like the shipper's
(``sidecar.shipper.trainer_session``).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import random
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.config import ModelPollerConfig
from sidecar.durable import write_atomic
from sidecar.models import is_sha256
from sidecar.process import read_limited
from sidecar.shipper import bearer, jittered_backoff, log_retry, trainer_session

log = logging.getLogger("faasrm.model_poller")


class ModelPoller:
    def __init__(
        self,
        node: Any,
        cfg: ModelPollerConfig,
        url: str,
        metrics: Any = None,
        token: str = "",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.node = node
        self.models = node.models
        self.cfg = cfg
        self.url = url.rstrip("/")
        self.metrics = metrics
        self.token = token
        self.ssl_context = ssl_context
        """Verifies the trainer's https certificate (None: the system's CAs)."""
        self.dir = Path(cfg.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.etag: str | None = None
        self.entries: dict[str, dict] = {}
        """Registry versions this node loaded, by sha256: {version, path, model, sha256}."""
        self.active: dict | None = None
        """The entry of the model running now (None: not a registry model)."""
        self.previous: dict | None = None
        """The entry of the model a rollback would return to (None: not a registry model)."""
        self.history: collections.deque[dict] = collections.deque(maxlen=50)
        saved = self._read_state()
        self.bad_sha: set[str] = {x for x in saved.get("rolled_back_sha256", []) if is_sha256(x)}
        """Versions rolled back on this node (kept in active.json): never adopted again."""
        self.watch: dict | None = None
        """The rollback watch of the model swapped in last: {version, model, sha256, n, slow}
        (in active.json, so a restart resumes it; None once confirmed or rolled back)."""
        self.polls = 0
        self.last_error: str | None = None
        self._rng = random.Random()
        node.record_observers.append(self.on_record)
        self.models.on_rollback.append(self._rolled_back)

    # ------------------------------------------------------------------------ adopting
    @property
    def active_version(self) -> int | None:
        return self.active["version"] if self.active else None

    def _read_state(self) -> dict:
        try:
            state = json.loads((self.dir / "active.json").read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def restore_active(self, reason: str = "restored after restart") -> None:
        """Reload the registry models of ``active.json`` (after a restart, or a SIGHUP reload of
        the local model file): the rollback target first, then the active version, each if it is
        still valid and was never rolled back."""
        saved = self._read_state()
        if isinstance(saved.get("etag"), str):
            self.etag = saved["etag"]
        active = saved if saved.get("version") is not None else None
        restored = None
        for entry in (saved.get("previous"), active):
            try:
                version, path = int(entry["version"]), Path(entry["path"])
            except (KeyError, TypeError, ValueError):
                continue
            if entry.get("sha256") in self.bad_sha or not path.exists():
                continue
            if not self.models.load(path):
                continue
            cur = self.models.current
            self.entries[cur.sha256] = _entry(version, path, cur.id, cur.sha256)
            restored = version
        watch = self.watch or saved.get("watch")
        resumed = isinstance(watch, dict) and watch.get("sha256") == self.models.current.sha256
        self.watch = watch if resumed and WATCH_KEYS <= set(watch) else None
        self._sync()
        if restored is not None:
            self._event(restored, self.models.current.sha256, "loaded", reason)

    def _sync(self) -> None:
        """Record which registry versions the model manager runs and would roll back to."""
        cur, prev = self.models.current, self.models.previous
        self.active = self.entries.get(cur.sha256 or "")
        self.previous = self.entries.get(prev.sha256 or "") if prev is not None else None
        if self.metrics is not None:
            self.metrics.model_version.set(self.active_version or 0)
            self.metrics.set_policy(cur.id)
        state = {
            **(self.active or {"version": None, "path": None, "model": None, "sha256": None}),
            "etag": self.etag,
            "previous": self.previous,
            "rolled_back_sha256": sorted(self.bad_sha),
            "watch": self.watch,
        }
        write_atomic(self.dir / "active.json", json.dumps(state).encode())

    def _path(self, version: int, sha: str) -> Path:
        """Named by version and content: two models under one version number (a trainer whose
        registry was reset) never overwrite each other's file."""
        return self.dir / f"v{version:06d}-{sha[:16]}.onnx"

    def _event(self, version: int | None, sha: str | None, result: str, reason: str = "") -> None:
        self.history.append(
            {
                "version": version,
                "sha256": sha,
                "result": result,
                "reason": reason,
                "time": time.time(),
            }
        )

    def refuse(self, version: int, sha: str, etag: str, reason: str) -> None:
        """Keep the running model and remember ``etag`` in active.json: a refused version is not
        fetched again until a newer one appears, across restarts too."""
        self.etag = etag
        self._sync()
        self._event(version, sha, "rejected", reason)
        if self.metrics is not None:
            self.metrics.model_updates.labels("rejected").inc()
        log.error(
            "registry model refused, keeping the running one",
            extra={"version": version, "reason": reason, "running": self.models.current.id},
        )

    def adopt(self, data: bytes, version: int, sha: str, etag: str) -> bool:
        """Validate and swap in a registry model whose ``data`` hashes to ``sha`` (checked at
        download); False if refused (the running one stays)."""
        if sha in self.bad_sha:
            self.refuse(version, sha, etag, "rolled back earlier on this node")
            return False
        path = self._path(version, sha)
        side = Path(str(path) + ".json")
        write_atomic(path, data)
        write_atomic(side, json.dumps({"sha256": sha, "version": version}).encode())
        ok = self.models.load(path)
        if self.metrics is not None:
            self.metrics.model_loads.labels("ok" if ok else "rejected").inc()
        if not ok:
            path.unlink(missing_ok=True)
            side.unlink(missing_ok=True)
            self.refuse(version, sha, etag, (self.models.last_error or {}).get("reason", "refused"))
            return False
        self.etag = etag
        if self.metrics is not None:
            self.metrics.model_updates.labels("loaded").inc()
        cur = self.models.current
        self.entries[cur.sha256] = _entry(version, path, cur.id, cur.sha256)
        self.watch = {"version": version, "model": cur.id, "sha256": sha, "n": 0, "slow": 0}
        self._sync()
        self._event(version, sha, "loaded")
        log.info(
            "registry model active", extra={"version": version, "model": self.models.current.id}
        )
        return True

    # ------------------------------------------------------------------------ rollback watch
    def on_record(self, rec: dict) -> None:
        w = self.watch
        if w is None or rec.get("model") != w["model"] or rec.get("outcome") == "lost":
            return
        w["n"] += 1
        base, dur = rec.get("baseline_s"), rec.get("duration_s")
        failed = rec.get("outcome") in ("failure", "oom")
        slow = bool(base) and dur is not None and dur > self.cfg.slowdown_rfet * base
        w["slow"] += int(failed or slow)
        if w["n"] >= self.cfg.min_invocations and w["slow"] / w["n"] > self.cfg.max_slowdown_rate:
            self.rollback(f"{w['slow']}/{w['n']} invocations slowed down or failed")
        elif w["n"] >= self.cfg.watch_invocations:
            self._event(w["version"], w["sha256"], "confirmed", f"{w['slow']}/{w['n']} slowed")
            self.watch = None
            self._sync()

    def rollback(self, reason: str) -> bool:
        """The watched model slowed invocations down: back to the previous model."""
        if self.watch is None or not self.models.rollback(reason):
            return False
        if self.metrics is not None:
            self.metrics.model_loads.labels("rollback").inc()
        return True

    def _rolled_back(self, bad: Any, now: Any, reason: str) -> None:
        """``ModelManager.on_rollback``: whoever rolled it back, a registry version is never
        taken again, and active.json names what runs now."""
        self.watch = None
        entry = self.entries.get(bad.sha256 or "")
        if entry is not None:
            self.bad_sha.add(entry["sha256"])
            self._event(entry["version"], entry["sha256"], "rolled_back", reason)
            if self.metrics is not None:
                self.metrics.model_updates.labels("rolled_back").inc()
            log.error(
                "registry model rolled back, never taken again",
                extra={"version": entry["version"], "running": now.id, "reason": reason},
            )
        self._sync()

    def close(self) -> None:
        """At the daemon's shutdown: save the watch's counts (written otherwise only when it
        starts and ends), so a clean restart resumes it where it was."""
        self._sync()

    # ------------------------------------------------------------------------ polling
    def backoff_s(self, attempt: int) -> float:
        return jittered_backoff(
            attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng
        )

    async def poll_once(self, session: Any) -> str:
        """One long-poll: 'new' (a new version, adopted or refused), 'same', 'none' or 'error'."""
        import aiohttp

        headers = bearer(self.token)
        if self.etag:
            headers["If-None-Match"] = self.etag
        url = f"{self.url}/v1/models/latest?wait={self.cfg.wait_s:g}"
        self.polls += 1
        try:
            async with session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=self.cfg.wait_s + 15)
            ) as r:
                if r.status == 304:
                    return "same"
                if r.status == 404:
                    return "none"
                if r.status != 200:
                    self.last_error = f"HTTP {r.status}"
                    return "error"
                etag = r.headers["ETag"]
                if etag == self.etag:  # a server or proxy that ignores If-None-Match: this
                    return "same"  # version was adopted or refused already
                version = int(r.headers["X-Model-Version"])
                sha = r.headers["X-Model-Sha256"].lower()
                data = await read_limited(r.content, r.content_length, self.cfg.max_model_bytes)
        except (TimeoutError, aiohttp.ClientError, OSError, KeyError, ValueError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return "error"
        if data is None:
            self.refuse(version, sha, etag, f"larger than {self.cfg.max_model_bytes} bytes")
            return "new"
        got = hashlib.sha256(data).hexdigest()
        if got != sha:  # damaged on the way: refused before it touches the disk, fetched again
            self.last_error = (
                f"version {version}: the download's sha256 {got[:16]}... is not its "
                f"X-Model-Sha256 {sha[:16]}..."
            )
            self._event(version, sha, "rejected", self.last_error)
            return "error"
        self.last_error = None
        self.adopt(data, version, sha, etag)
        return "new"

    async def run(self) -> None:
        attempt = 0
        interval = min(1.0, self.cfg.wait_s)
        async with trainer_session(self.ssl_context) as session:
            while True:
                started = time.monotonic()
                result = await self.poll_once(session)
                if result == "error":
                    delay = self.backoff_s(attempt)
                    attempt += 1
                    log_retry(log, "model poll failed", self.last_error, attempt, delay)
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                # at most one poll per interval: a trainer (or proxy) that answers 304 or 404
                # without waiting out the long-poll must not make the node spin
                await asyncio.sleep(max(0.0, started + interval - time.monotonic()))

    def status(self) -> dict:
        return {
            "url": self.url,
            "active_version": self.active_version,
            "active_model": self.active["model"] if self.active else None,
            "previous_version": self.previous["version"] if self.previous else None,
            "rolled_back_sha256": sorted(self.bad_sha),
            "etag": self.etag,
            "watching": dict(self.watch) if self.watch else None,
            "history": list(self.history),
            "polls": self.polls,
            "last_error": self.last_error,
        }


WATCH_KEYS = frozenset({"version", "model", "sha256", "n", "slow"})
"""What a rollback watch holds (``ModelPoller.watch``)."""


def _entry(version: int, path: Path, model: str, sha256: str | None) -> dict:
    return {"version": version, "path": str(path), "model": model, "sha256": sha256}


POLLER = web.AppKey("model_poller", ModelPoller)
