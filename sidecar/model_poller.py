"""Follow the trainer's model registry: long-poll, validate, hot-swap, watch, roll back.

``GET /v1/models/latest?wait=S`` with ``If-None-Match`` returns as soon as a newer version is
promoted (304 otherwise). A new model is written to ``model_poller.dir`` (with its sha256 beside
it) and loaded by ``sidecar.models.ModelManager.load``: every check a local model file gets
(sha256, onnxruntime, feature version/schema hash/grid, finite scores on probe rows). A refused
model leaves the running one in place; its ETag is remembered, so it is not fetched again until a
newer version appears.

The swap runs on the event loop, which also makes every decision: a decision sees the old model or
the new one, never a mix. After a swap the poller watches the new model's finished invocations
(``Node.record_observers``): once ``min_invocations`` have run, if more than
``max_slowdown_rate`` of them were slowed down (duration above ``slowdown_rfet`` x baseline) or
failed, it rolls back to the previous model and never adopts that version again. After
``watch_invocations`` the model is confirmed. ``/debug/model`` shows the active registry version
and this history.

The active version is recorded in ``<dir>/active.json``: a restarted daemon reloads it at once,
and its first poll carries that ETag. Requests carry the trainer's bearer token and verify its
https certificate like the shipper's (``sidecar.shipper.trainer_session``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import random
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.config import ModelPollerConfig
from sidecar.shipper import bearer, jittered_backoff, trainer_session

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
        self.active_version: int | None = None
        self.active_model_id: str | None = None
        self.history: collections.deque[dict] = collections.deque(maxlen=50)
        self.bad_sha: set[str] = set()
        self.watch: dict | None = None
        self.polls = 0
        self.last_error: str | None = None
        self._rng = random.Random()
        node.record_observers.append(self.on_record)

    # ------------------------------------------------------------------------ adopting
    def restore_active(self, reason: str = "restored after restart") -> None:
        """Reload the registry model that was active (after a restart, or a SIGHUP reload of
        the local model file), if it is still valid."""
        try:
            a = json.loads((self.dir / "active.json").read_text())
            version, etag, path = int(a["version"]), str(a["etag"]), Path(a["path"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if path.exists() and self.models.load(path):
            self._set_active(version, etag, self.models.current.id)
            self._event(version, self.models.current.sha256, "loaded", reason)

    def _set_active(self, version: int | None, etag: str | None, model_id: str | None) -> None:
        self.active_version, self.active_model_id = version, model_id
        if etag is not None:
            self.etag = etag
        if self.metrics is not None:
            self.metrics.model_version.set(version or 0)
            self.metrics.set_policy(self.models.current.id)
        tmp = self.dir / "active.json.tmp"
        if version is None:
            (self.dir / "active.json").unlink(missing_ok=True)
            return
        tmp.write_text(
            json.dumps(
                {
                    "version": version,
                    "etag": self.etag,
                    "path": str(self._path(version)),
                    "model": model_id,
                }
            )
        )
        os.replace(tmp, self.dir / "active.json")

    def _path(self, version: int) -> Path:
        return self.dir / f"v{version:06d}.onnx"

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

    def adopt(self, data: bytes, version: int, sha: str, etag: str) -> bool:
        """Validate and swap in a registry model; False if refused (the running one stays)."""
        self.etag = etag  # a refused version is not fetched again
        if sha in self.bad_sha:
            self._event(version, sha, "rejected", "rolled back earlier on this node")
            return False
        path = self._path(version)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        Path(str(path) + ".json").write_text(json.dumps({"sha256": sha, "version": version}))
        prev_version, prev_id = self.active_version, self.models.current.id
        ok = self.models.load(path)
        if self.metrics is not None:
            self.metrics.model_loads.labels("ok" if ok else "rejected").inc()
            self.metrics.model_updates.labels("loaded" if ok else "rejected").inc()
        if not ok:
            reason = (self.models.last_error or {}).get("reason", "refused")
            self._event(version, sha, "rejected", reason)
            log.error(
                "registry model refused, keeping the running one",
                extra={"version": version, "reason": reason, "running": self.models.current.id},
            )
            path.unlink(missing_ok=True)
            return False
        self._set_active(version, etag, self.models.current.id)
        self.watch = {
            "version": version,
            "model": self.models.current.id,
            "sha256": sha,
            "prev_version": prev_version,
            "prev_model": prev_id,
            "n": 0,
            "slow": 0,
        }
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

    def rollback(self, reason: str) -> bool:
        w = self.watch
        if w is None:
            return False
        self.watch = None
        self.bad_sha.add(w["sha256"])
        if not self.models.rollback(reason):
            return False
        if self.metrics is not None:
            self.metrics.model_loads.labels("rollback").inc()
            self.metrics.model_updates.labels("rolled_back").inc()
        self._event(w["version"], w["sha256"], "rolled_back", reason)
        back = w["prev_version"] if self.models.current.id == w["prev_model"] else None
        self._set_active(back, None, self.models.current.id)
        return True

    # ------------------------------------------------------------------------ polling
    def backoff_s(self, attempt: int) -> float:
        return jittered_backoff(
            attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, self._rng
        )

    async def poll_once(self, session: Any) -> str:
        """One long-poll: 'new', 'same', 'none' or 'error'."""
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
                data = await r.read()
                version = int(r.headers["X-Model-Version"])
                sha = r.headers["X-Model-Sha256"]
                etag = r.headers["ETag"]
        except (TimeoutError, aiohttp.ClientError, OSError, KeyError, ValueError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            return "error"
        self.last_error = None
        self.adopt(data, version, sha, etag)
        return "new"

    async def run(self) -> None:
        attempt = 0
        async with trainer_session(self.ssl_context) as session:
            while True:
                result = await self.poll_once(session)
                if result == "error":
                    delay = self.backoff_s(attempt)
                    attempt += 1
                    if attempt == 1 or attempt % 10 == 0:
                        log.warning(
                            "model poll failed",
                            extra={
                                "reason": self.last_error,
                                "attempt": attempt,
                                "delay_s": round(delay, 3),
                            },
                        )
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                if result == "none":
                    await asyncio.sleep(min(1.0, self.cfg.wait_s))  # 404 answers at once if the
                    # trainer's wait is shorter; never spin

    def status(self) -> dict:
        return {
            "url": self.url,
            "active_version": self.active_version,
            "active_model": self.active_model_id,
            "etag": self.etag,
            "watching": dict(self.watch) if self.watch else None,
            "history": list(self.history),
            "polls": self.polls,
            "last_error": self.last_error,
        }


POLLER = web.AppKey("model_poller", ModelPoller)
