"""Helpers for the trainer service tests: an in-process server thread, valid records, a client."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from training.bench_trainer import GRID, pack_batch, synthetic_record

TOKEN = "test-token"
batch = pack_batch  # the tests' name for a trajectory batch body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record(node: str = "n1", i: int = 0, reward: float | None = -0.1, rng=None) -> dict:
    return synthetic_record(node, i, rng or np.random.default_rng(i), reward)


def http(
    url: str,
    data: bytes | None = None,
    token: str | None = TOKEN,
    headers: dict | None = None,
    timeout: float = 10.0,
    method: str | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict, bytes]:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def js(body: bytes) -> Any:
    return json.loads(body)


class ServerThread:
    """``training.service.serve`` on its own event loop in a thread (port chosen here); https
    when the overrides name a certificate, ``context`` then verifying it."""

    def __init__(
        self, data_dir: Path, context: ssl.SSLContext | None = None, **overrides: Any
    ) -> None:
        from training.service import load_config

        self.port = int(overrides.pop("port", 0)) or free_port()
        ov = {
            "port": self.port,
            "data_dir": str(data_dir),
            "token": TOKEN,
            "learner.enabled": False,
            "grid.cpu_unit_cores": GRID.cpu_unit_cores,
            "grid.mem_unit_mb": GRID.mem_unit_mb,
        }
        ov.update(overrides)
        self.cfg = load_config(None, ov)
        self.context = context
        self.url = f"{'https' if self.cfg.tls_cert_file else 'http'}://127.0.0.1:{self.port}"
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from training.service import serve

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.cfg, self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def start(self) -> ServerThread:
        self._t.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if (
                    http(self.url + "/healthz", None, None, timeout=1, context=self.context)[0]
                    == 200
                ):
                    return self
            except OSError:
                pass
            if self.error:
                raise self.error
            time.sleep(0.02)
        raise AssertionError("trainer did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._t.join(timeout=20)
        if self.error:
            raise self.error

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
