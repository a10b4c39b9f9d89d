"""A real ``faasrm sidecar run`` subprocess and real worker processes in v1 cgroups, for the
end-to-end tests (``test_daemon_e2e.py``, the debug page's browser test, the monitoring tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sidecar import cgroups, config
from training.processes import call

ROOT = cgroups.DEFAULT_ROOT

WORKER = r"""
import sys, time
hold = []
def touch(n_mb):
    b = bytearray(n_mb * 2**20)
    b[::4096] = b"x" * len(range(0, len(b), 4096))
    return b
print("up", flush=True)
for line in sys.stdin:
    cmd, *a = line.split()
    if cmd == "duty":  # duty SECONDS BUSY_FRACTION [FULL_BUSY_AFTER_S]
        dur, frac = float(a[0]), float(a[1])
        jump = float(a[2]) if len(a) > 2 else None
        t0 = time.monotonic(); tj = -1.0
        while (now := time.monotonic()) - t0 < dur:
            if jump is not None and now - t0 >= jump:
                if tj < 0: tj = now
                continue
            b = time.monotonic()
            while time.monotonic() - b < 0.02 * frac: pass
            time.sleep(0.02 * (1 - frac))
        print("done", tj, flush=True)
    elif cmd == "mem":  # mem HOLD_MB [GROW_MB GROW_S]: hold memory, optionally grow it gradually
        hold.append(touch(int(a[0])))
        if len(a) > 1:
            steps = int(a[1]) // 4
            for _ in range(steps):
                hold.append(touch(4)); time.sleep(float(a[2]) / steps)
        time.sleep(0.3)
        print("done", flush=True)
    elif cmd == "free":
        hold.clear(); print("done", flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """``faasrm sidecar run --config cfg_path``; ``call`` talks to it on its unix socket."""

    def __init__(self, cfg_path: Path, port: int, log: Path, env: dict | None = None) -> None:
        self.port = port
        self.socket = config.load(cfg_path).server.socket
        self.log = log
        self.started = time.monotonic()
        with open(log, "ab") as err:  # the child keeps its own copy of the fd
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", "sidecar", "run", "--config", str(cfg_path)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={**os.environ, **(env or {})},
            )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def call(self, path: str, body: dict | None = None) -> tuple[int, Any]:
        return call(path, body, unix_socket=self.socket)

    def wait_ready(self, timeout_s: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode}: {self.log.read_text()[-3000:]}"
                )
            try:
                status, body = self.call("/readyz")
                if status == 200:
                    return body
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)


class Box:
    """A child cgroup with a worker process in it."""

    def __init__(self, rel: str) -> None:
        self.rel = rel
        self.cg = cgroups.create_v1(rel)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=cgroups.join_in_child(self.cg),
        )
        assert self.proc.stdout.readline().strip() == "up"

    def file(self, controller: str, name: str) -> str:
        return Path(ROOT, controller, self.rel, name).read_text()

    def quota_cores(self) -> float:
        return int(self.file("cpu", "cpu.cfs_quota_us")) / int(
            self.file("cpu", "cpu.cfs_period_us")
        )

    def mem_limit(self) -> int:
        return int(self.file("memory", "memory.limit_in_bytes"))

    def cpu_s(self) -> float:
        return int(self.file("cpuacct", "cpuacct.usage")) / 1e9

    def oom_kills(self) -> int:
        return int(self.file("memory", "memory.oom_control").split("oom_kill ")[1].split()[0])

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_done(self) -> list[str]:
        out = self.proc.stdout.readline().split()
        assert out and out[0] == "done", out
        return out[1:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.cg.close()
        cgroups.remove_v1(self.rel)


def write_config(
    tmp_path: Path,
    port: int,
    boxes: dict[str, tuple[str, float, float]],
    model: Path,
    tick_s: float = 0.1,
    extra: tuple[str, ...] = (),
    server: str = "",
    actuation: str = "",
) -> Path:
    """A sidecar config managing ``boxes`` (path -> (function, cores, MB)), its API socket in
    ``tmp_path`` unless ``server`` (more ``[server]`` keys) says otherwise; ``extra``: more TOML
    sections; ``actuation``: more ``[actuation]`` keys."""
    if "socket =" not in server:
        server += f"\nsocket = '{tmp_path / 'sidecar.sock'}'"
    lines = [
        "log_level = 'info'",
        f"[server]\nport = {port}\n{server.strip()}",
        "[grid]\ncpu_unit_cores = 0.25\ncpu_units = 8\nmem_unit_mb = 64.0\nmem_units = 8",
        f"[sampler]\ntick_s = {tick_s}\ndiscover_every_s = {max(2.0, tick_s)}",
        f"[actuation]\nstate_file = '{tmp_path / 'state.json'}'\n{actuation.strip()}",
        f"[spool]\ndir = '{tmp_path / 'spool'}'",
        f"[model]\npath = '{model}'",
        *extra,
        "[cgroupfs]\nversion = 1",
    ]
    for rel, (fn, cpu, mem) in boxes.items():
        lines.append(
            f"[[cgroupfs.containers]]\npath = '{rel}'\nfunction = '{fn}'\n"
            f"cpu_cores = {cpu}\nmem_mb = {mem}"
        )
    p = tmp_path / "sidecar.toml"
    p.write_text("\n".join(lines) + "\n")
    return p
