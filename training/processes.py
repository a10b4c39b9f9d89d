"""Sidecar and trainer-service subprocesses on this machine, and the HTTP helper that talks to them.

``SidecarProcess`` runs ``python -m sidecar sidecar run --config <file>`` on a TOML file written
from a sections dict (its defaults for the server, actuation state and spool live in its working
directory; callers add or override any section, e.g. ``cgroupfs``, ``docker``, ``shipper``,
``model``). ``TrainerProcess`` runs ``faasrm trainer serve`` with ``--set`` overrides. Both wait for
their readiness endpoint and stop with SIGTERM (SIGKILL after 30 s). A sidecar's hooks are called on
its unix socket (``SidecarProcess.call``), the rest of its API over TCP as well. Used by ``faasrm
bench real`` / ``faasrm demo`` (``training.invoker.real``), ``faasrm testbed up``
(``training.testbed``), ``faasrm bench trainer`` and ``faasrm bench faults``;
``v1_unavailable`` says why real v1 cgroups cannot be made here (they and the tests need them).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

TOKEN = "testbed-local-token"
"""The bearer token of every local trainer service and of the sidecars shipping to it."""


def v1_unavailable(root: str = "") -> str | None:
    """Why this process cannot make real v1 cgroups (the testbed's, the tests'), or None."""
    from sidecar import cgroups

    root = root or cgroups.DEFAULT_ROOT
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    for controller in cgroups.V1_CONTROLLERS:
        path = os.path.join(root, controller)
        if not os.path.isfile(os.path.join(path, "cgroup.procs")):
            return f"no cgroup v1 '{controller}' hierarchy at {path}"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
    if not os.path.isfile(os.path.join(root, "cpu", "cpu.cfs_quota_us")):
        return "the v1 cpu hierarchy has no CFS quota"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the sidecar's hook API)."""

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _parsed(status: int, raw: bytes) -> tuple[int, Any]:
    try:
        return status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw
    except ValueError:
        return status, raw


def unix_request(
    sock: str | Path, method: str, target: str, body: bytes | None = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """One request with a raw JSON ``body`` on a unix socket: (status, parsed JSON, or the raw
    bytes of any other body); OSError when it cannot connect or the answer breaks off."""
    conn = UnixHTTPConnection(sock, timeout)
    try:
        conn.request(method, target, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return _parsed(r.status, r.read())
    finally:
        conn.close()


def call(
    url: str, body: dict | None = None, timeout: float = 10.0, unix_socket: str | Path = ""
) -> tuple[int, Any]:
    """GET (or POST ``body`` as JSON); (status, parsed JSON, or the raw bytes of any other body).
    With ``unix_socket``, over that socket (only the path of ``url`` matters then)."""
    data = None if body is None else json.dumps(body).encode()
    method = "POST" if data is not None else "GET"
    headers = {"Content-Type": "application/json"}
    if unix_socket:
        parts = urllib.parse.urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        return unix_request(unix_socket, method, target, data, timeout)
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return _parsed(r.status, r.read())
    except urllib.error.HTTPError as e:
        return _parsed(e.code, e.read())


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> Any:
    """The body of the first 200 from ``url``; raises with the log's tail if the child exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            status, body = call(url, timeout=2)
            if status == 200:
                return body
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {timeout_s}s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen | None, sig: int) -> None:
    """Signal a child and reap it; SIGKILL if it has not exited within 30 s."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_toml(path: Path, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
    """Top-level keys, then one ``[section]`` table per entry (scalar values only)."""
    lines = [f"{k} = {_toml(v)}" for k, v in top.items()]
    for sec, kv in sections.items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml(v)}" for k, v in kv.items()]
    path.write_text("\n".join(lines) + "\n")


class TrainerProcess:
    """A ``faasrm trainer serve`` subprocess on 127.0.0.1, its data under ``workdir/data``."""

    def __init__(self, workdir: Path, port: int, overrides: dict[str, Any]) -> None:
        self.dir = workdir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.overrides = overrides
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "trainer.log"

    def start(self, wait: bool = True) -> None:
        sets = []
        for k, v in self.overrides.items():
            sets += ["--set", f"{k}={_toml(v)}"]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "sidecar",
                    "trainer",
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.dir / "data"),
                    *sets,
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, "FAASRM_TRAINER_TOKEN": TOKEN},
            )
        if wait:
            self.wait()

    def wait(self) -> None:
        assert self.proc is not None
        _wait_ready(self.url + "/healthz", self.proc, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        _stop(self.proc, sig)

    def records(self, timeout: float = 5.0) -> int:
        """Trajectory records the service has stored (-1 when it does not answer)."""
        try:
            status, body = call(self.url + "/healthz", timeout=timeout)
        except OSError:
            return -1
        return int(body.get("records", -1)) if status == 200 else -1

    def shipper(self, state_file: Path, **settings: Any) -> dict[str, Any]:
        """A sidecar's ``[shipper]`` section shipping to this service."""
        return {
            "enabled": True,
            "url": self.url,
            "token": TOKEN,
            "state_file": str(state_file),
            **settings,
        }


class SidecarProcess:
    """A ``faasrm sidecar run`` subprocess with its config, state, spool and API socket in
    ``workdir`` (the read-only endpoints also on 127.0.0.1).

    ``sections`` adds to or overrides the defaults section by section (``{"model": {"path":
    ..., "rule": "smallest"}}``). ``invoker_child``: die with this process (PDEATHSIG) and in a
    new session, so Ctrl-C reaches only the caller, which stops the sidecar itself.
    """

    def __init__(
        self,
        workdir: Path,
        sections: dict[str, dict[str, Any]],
        *,
        node_id: str | None = None,
        log_level: str = "info",
        invoker_child: bool = False,
    ) -> None:
        self.id = node_id
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket = (workdir / "sidecar.sock").absolute()
        self.log = workdir / "sidecar.log"
        self.invoker_child = invoker_child
        self.proc: subprocess.Popen | None = None
        merged: dict[str, dict[str, Any]] = {
            "server": {"host": "127.0.0.1", "port": self.port, "socket": str(self.socket)},
            "actuation": {"state_file": str(workdir / "state.json")},
            "spool": {"dir": str(workdir / "spool")},
        }
        for sec, kv in sections.items():
            merged.setdefault(sec, {}).update(kv)
        top = {"node_id": node_id} if node_id is not None else {}
        self.config = workdir / "sidecar.toml"
        write_toml(self.config, {**top, "log_level": log_level}, merged)

    def start(self, wait: bool = True) -> dict | None:
        """Start it; with ``wait``, the body of its first ready ``/readyz``."""
        extra: dict[str, Any] = {}
        if self.invoker_child:
            from training.invoker.invoker import child_setup

            extra = {"start_new_session": True, "preexec_fn": child_setup()}
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "sidecar", "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                **extra,
            )
        return self.wait() if wait else None

    def wait(self) -> dict:
        assert self.proc is not None
        return _wait_ready(self.url + "/readyz", self.proc, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: the sidecar restores every container's user limits, then exits."""
        _stop(self.proc, sig)

    def call(self, path: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, Any]:
        """``call`` on the sidecar's unix socket: the hooks (``POST /v1/invocations``) or any
        other endpoint."""
        return call(path, body, timeout, unix_socket=self.socket)

    def metric(self, name: str) -> float:
        """Sum of every series of a Prometheus counter (0 when absent or not answering)."""
        try:
            status, body = call(self.url + "/metrics", timeout=5)
        except OSError:
            return 0.0
        if status != 200:
            return 0.0
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until the trainer has acknowledged a trajectory record for every finished
        invocation (the spool would keep the rest on disk, but this sidecar will not restart)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.metric("faasrm_shipper_records_total") >= self.metric(
                "faasrm_invocations_total"
            ):
                return True
            time.sleep(0.2)
        return False

    def model(self) -> dict:
        st, body = call(self.url + "/debug/model", timeout=5)
        return body if st == 200 else {}

    def active_version(self) -> int | None:
        try:
            reg = self.model().get("registry") or {}
        except OSError:
            return None
        return reg.get("active_version")
