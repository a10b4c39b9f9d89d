"""The trainer's durable state on disk: accepted trajectory batches and promoted model versions.

Trajectory store (``<data_dir>/trajectories.sqlite``): one row per accepted batch, the request
body stored verbatim (it is already msgpack: never re-encoded, no per-record rows),
``UNIQUE(node, seq)`` for idempotency, WAL with ``synchronous=FULL`` so a commit is on disk before
the 2xx reply (one WAL fsync per batch), 64 KiB pages for new stores. One writer connection, used
by one thread at a time (the service runs it on a single-thread executor).

Model registry (``<data_dir>/models/``): ``<version:06d>/model.onnx`` + ``meta.json``
(version, sha256, export metadata, evaluation, source, created) and optionally ``agent.pt`` (the
torch state the online learner continues from). Only models a node can run get in: ``add`` runs
the nodes' own checks (``sidecar.models.validate``) on the registry's grid first, so the latest
version is always one a freshly started node accepts. A version directory is written under a
temporary name, fsynced and renamed, then ``LATEST`` is replaced atomically: a crash leaves
either the old or the new latest, never a half-written one. ``add(replaces=N)`` stores nothing
(``Superseded``) unless N is still the latest: the online learner gated its candidate against N,
and a version published meanwhile must not be replaced by a model never compared with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from sidecar.core.grid import ResourceGrid
from sidecar.models import validate


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------ trajectories
class TrajectoryStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        # 64 KiB pages: a batch body (~1 KiB per record, ~2 MiB for the shipper's 2000) spans
        # 16x fewer overflow pages than with the 4 KiB default, which halves sqlite's CPU per
        # commit. Takes effect only when the file is created (before WAL); older stores keep
        # their page size and work as before.
        self._db.execute("PRAGMA page_size=65536")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batches ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL, seq INTEGER NOT NULL,"
            " n INTEGER NOT NULL, rewarded INTEGER NOT NULL, received REAL NOT NULL,"
            " body BLOB NOT NULL, UNIQUE(node, seq))"
        )
        b, n, r = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(n), 0), COALESCE(SUM(rewarded), 0) FROM batches"
        ).fetchone()
        self._totals = (int(b), int(n), int(r))

    def add(self, node: str, seq: int, n: int, rewarded: int, body: bytes) -> bool:
        """Store a batch durably; False if (node, seq) was stored before (nothing written)."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO batches (node, seq, n, rewarded, received, body)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (node, seq, n, rewarded, time.time(), body),
            )
            if cur.rowcount != 1:
                return False
            b, tn, tr = self._totals
            self._totals = (b + 1, tn + n, tr + rewarded)
            return True

    def counts(self) -> dict[str, int]:
        """Stored batches, records and rewarded records, kept in memory (the one writer is this
        object): /healthz reads them on the event loop and must never wait for a commit."""
        b, n, r = self._totals
        return {"batches": b, "records": n, "rewarded": r}

    def max_id(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM batches").fetchone()[0])

    def rewarded_since(self, batch_id: int) -> int:
        with self._lock:
            return int(
                self._db.execute(
                    "SELECT COALESCE(SUM(rewarded), 0) FROM batches WHERE id > ?", (batch_id,)
                ).fetchone()[0]
            )

    def iter_records(self, after_id: int = 0, newest_first: bool = False) -> Iterator[dict]:
        order = "DESC" if newest_first else "ASC"
        with self._lock:
            rows = self._db.execute(
                f"SELECT body FROM batches WHERE id > ? ORDER BY id {order}", (after_id,)
            ).fetchall()
        for (body,) in rows:
            recs = msgpack.unpackb(body, raw=False)["records"]
            yield from (reversed(recs) if newest_first else recs)

    def recent(self, limit: int) -> list[dict]:
        """The newest ``limit`` records, oldest first."""
        out = []
        for rec in self.iter_records(newest_first=True):
            out.append(rec)
            if len(out) >= limit:
                break
        out.reverse()
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


# ------------------------------------------------------------------------------------ models
class Superseded(RuntimeError):
    """The latest version is not the one a candidate was gated against: adding it would replace
    a model it was never compared with."""


@dataclass(frozen=True)
class Version:
    version: int
    sha256: str
    meta: dict[str, Any]
    dir: Path

    @property
    def etag(self) -> str:
        return f'"v{self.version}-{self.sha256[:16]}"'

    @property
    def onnx_path(self) -> Path:
        return self.dir / "model.onnx"

    @property
    def checkpoint_path(self) -> Path | None:
        p = self.dir / "agent.pt"
        return p if p.exists() else None

    def onnx_bytes(self) -> bytes:
        return self.onnx_path.read_bytes()


class Registry:
    def __init__(self, directory: str | Path, grid: ResourceGrid) -> None:
        self.dir = Path(directory)
        self.grid = grid
        """The nodes' grid: every stored model must run on it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        for stale in self.dir.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self._latest = self._load_latest()

    def _vdir(self, version: int) -> Path:
        return self.dir / f"{version:06d}"

    def _load_latest(self) -> Version | None:
        try:
            v = int((self.dir / "LATEST").read_text().strip())
        except (OSError, ValueError):
            return None
        return self.get(v)

    def get(self, version: int) -> Version | None:
        d = self._vdir(version)
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return Version(version, meta["sha256"], meta, d)

    def latest(self) -> Version | None:
        return self._latest

    def versions(self) -> list[int]:
        return sorted(int(p.name) for p in self.dir.iterdir() if p.is_dir() and p.name.isdigit())

    def add(
        self,
        onnx: bytes,
        metadata: dict | None = None,
        evaluation: dict | None = None,
        checkpoint: bytes | str | Path | None = None,
        source: str = "publish",
        replaces: int | None = None,
    ) -> Version:
        """Store a new version and make it the latest (durably); returns it. Raises
        ``sidecar.models.ModelRejected`` (nothing stored) for a model no node could run, and
        Superseded (nothing stored) when ``replaces`` (the version the candidate was gated
        against, 0: none; None: no check, an operator's publish) is no longer the latest."""
        validate(onnx, self.grid, None)
        sha = hashlib.sha256(onnx).hexdigest()
        with self._lock:
            latest = self._latest.version if self._latest is not None else 0
            if replaces is not None and replaces != latest:
                raise Superseded(
                    f"the latest version is {latest}, not {replaces} the candidate was gated "
                    "against (0: none): another was published since"
                )
            version = max(self.versions(), default=0) + 1
            tmp = self.dir / f".tmp-{version}-{os.getpid()}"
            tmp.mkdir()
            _write_durable(tmp / "model.onnx", onnx)
            if checkpoint is not None:
                data = (
                    checkpoint if isinstance(checkpoint, bytes) else Path(checkpoint).read_bytes()
                )
                _write_durable(tmp / "agent.pt", data)
            meta = {
                "version": version,
                "sha256": sha,
                "size_bytes": len(onnx),
                "metadata": metadata or {},
                "evaluation": evaluation or {},
                "source": source,
                "created": time.time(),
            }
            _write_durable(tmp / "meta.json", json.dumps(meta, indent=2, default=str).encode())
            _fsync_dir(tmp)
            os.rename(tmp, self._vdir(version))
            _fsync_dir(self.dir)
            latest_tmp = self.dir / "LATEST.tmp"
            _write_durable(latest_tmp, f"{version}\n".encode())
            os.replace(latest_tmp, self.dir / "LATEST")
            _fsync_dir(self.dir)
            v = Version(version, sha, meta, self._vdir(version))
            self._latest = v
            return v
