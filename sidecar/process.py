"""Process plumbing shared by both daemons (the node's sidecar and the trainer service).

JSON-lines logging on stderr, systemd's sd_notify, starting a listener, strict JSON responses, the
bearer token check and size-bounded body reads: one definition each, so the two services log,
report readiness, listen, serialise, authorize and bound what a peer sends alike. No torch, no
node state.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Any

from aiohttp import StreamReader, web

from sidecar.config import ConfigError

log = logging.getLogger("faasrm.process")


async def start_site(site: web.BaseSite, keys: str) -> None:
    """Start listening on ``site``. An address it cannot take (in use, not this host's, a
    privileged port) is a ConfigError naming ``keys``: a one-line error and exit code 2, as any
    config error, rather than a traceback."""
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(f"{keys}: {os.strerror(exc.errno) if exc.errno else exc}") from None


# ------------------------------------------------------------------------------------ logging
_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    """JSON lines on stderr at ``level`` (journald keeps them); aiohttp's access log muted."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------ sd_notify
class Notifier:
    """sd_notify over an AF_UNIX datagram socket ($NOTIFY_SOCKET); a no-op without one."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_interval_s = watchdog_usec / 1e6 / 4 if watchdog_usec else None
        self._last_watchdog = -1e18
        self.sent: list[str] = []

    @classmethod
    def from_env(cls) -> Notifier:
        wd = os.environ.get("WATCHDOG_USEC")
        wd_pid = os.environ.get("WATCHDOG_PID")
        usec = (
            int(wd) if wd and wd.isdigit() and (not wd_pid or wd_pid == str(os.getpid())) else None
        )
        return cls(os.environ.get("NOTIFY_SOCKET"), usec)

    def send(self, message: str) -> bool:
        if not self.address:
            return False
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message.encode(), addr)
        except OSError as exc:
            log.warning("sd_notify failed", extra={"reason": str(exc)})
            return False
        self.sent.append(message.split("\n", 1)[0])
        del self.sent[:-20]
        return True

    def ready(self) -> None:
        self.send(f"READY=1\nSTATUS=managing containers\nMAINPID={os.getpid()}")

    def watchdog(self) -> None:
        if self.watchdog_interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_watchdog >= self.watchdog_interval_s:
            self._last_watchdog = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")


# ------------------------------------------------------------------------------------ strict JSON
def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def strict_dumps(obj: Any) -> str:
    """Strict JSON: a NaN/inf anywhere becomes null rather than invalid JSON."""
    try:
        return json.dumps(obj, default=str, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), default=str, allow_nan=False)


def json_response(data: Any, status: int = 200) -> web.Response:
    """An aiohttp JSON response serialised with :func:`strict_dumps`."""
    return web.json_response(data, status=status, dumps=strict_dumps)


# ------------------------------------------------------------------------------------ auth
def bearer_matches(request: web.Request, token: str) -> bool:
    """Whether the request carries ``Authorization: Bearer <token>`` (compared in constant time).

    aiohttp decodes header bytes that are not UTF-8 with surrogateescape: encoded back the same
    way they are just a wrong token (401), never an encoding error (500).
    """
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        sent.strip().encode("utf-8", "surrogateescape"), token.encode()
    )


async def read_limited(
    content: StreamReader, content_length: int | None, limit: int
) -> bytes | None:
    """A request's or a response's body, or None if it is larger than ``limit``: refused on its
    Content-Length before reading, and as soon as a body without one grows beyond it, so a peer
    can never make this process hold more."""
    if content_length is not None and content_length > limit:
        return None
    chunks, total = [], 0
    async for chunk in content.iter_chunked(1 << 16):
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
