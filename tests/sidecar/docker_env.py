"""A real Docker Engine for the Docker runtime tests, or the exact reason there is none.

Order of attempts (session scope, see ``docker_engine``):

1. ``FAASRM_DOCKER=0`` -> skip. An engine that already answers (``DOCKER_HOST`` or the default
   socket, then this module's own socket left by a concurrent session) is used as it is and never
   stopped.
2. Otherwise, as root only: if ``dockerd`` or a static busybox is missing, install ``docker.io``
   and ``busybox-static`` with apt-get -- only when ``CI`` is set or ``FAASRM_DOCKER_INSTALL=1``
   (apt-get update first, time-boxed; a temporary policy-rc.d, unless one exists, keeps the
   package from starting the system dockerd). Then start a private ``dockerd`` with everything
   under ``/tmp/faasrm-dockerd`` (data root, exec root, pidfile, log), listening only on
   ``unix:///tmp/faasrm-dockerd.sock``, with no bridge and no iptables rules (containers run with
   ``--network none``), wait <= 30 s for it, and stop it and delete its files at the end.
3. Anything that fails -> ``pytest.skip`` with the reason (and the dockerd log's tail).

Images cannot be pulled here: ``busybox_image`` imports a tarball of a root filesystem holding the
static busybox and ``sh``/``sleep`` links.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

PRIVATE_DIR = "/tmp/faasrm-dockerd"
PRIVATE_SOCK = "unix:///tmp/faasrm-dockerd.sock"
LOCK_FILE = "/tmp/faasrm-dockerd.lock"
READY_TIMEOUT_S = 30.0
APT_TIMEOUT_S = 240.0  # inside pytest-timeout's 300 s (which counts fixture setup)
BUSYBOX = "/bin/busybox"
IMAGE = "faasrm-test/busybox:latest"
APPLETS = ("sh", "sleep", "true", "cat", "echo")


@dataclass(frozen=True)
class DockerEngine:
    base_url: str | None  # None: docker.from_env() (DOCKER_HOST or the default socket)
    owned: bool  # started by this session (stopped at its end)
    setup_s: float  # time to get it (install excluded when nothing was installed)
    installed: tuple[str, ...]  # Debian packages apt-get installed for it


def _client(base_url: str | None, timeout: float = 10.0):  # noqa: ANN202
    import docker

    if base_url:
        return docker.DockerClient(base_url=base_url, timeout=timeout)
    return docker.from_env(timeout=timeout)


def _answers(base_url: str | None) -> bool:
    try:
        client = _client(base_url, timeout=3)
    except Exception:  # noqa: BLE001 (no socket, bad DOCKER_HOST, ...)
        return False
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001
        return False
    finally:
        client.close()


def _is_static_elf(path: str) -> bool:
    """True for an ELF without a PT_INTERP program header (runs in an empty root filesystem)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only (this machine)
                return False
            phoff = int.from_bytes(head[32:40], "little")
            phentsize = int.from_bytes(head[54:56], "little")
            phnum = int.from_bytes(head[56:58], "little")
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
    except OSError:
        return False
    return all(
        int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") != 3  # PT_INTERP
        for i in range(phnum)
    )


def _missing_packages() -> list[str]:
    missing = []
    if shutil.which("dockerd") is None:
        missing.append("docker.io")
    if not _is_static_elf(BUSYBOX):
        missing.append("busybox-static")
    return missing


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str | None:
    """Run a command; None on success, else why it failed (with its output's tail)."""
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s"
    except OSError as exc:
        return f"`{' '.join(cmd)}` could not run: {exc}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return f"`{' '.join(cmd)}` exited {proc.returncode}: {' | '.join(tail)}"
    return None


@contextlib.contextmanager
def _no_service_start() -> Iterator[None]:
    """Debian's policy-rc.d convention: exit 101 = maintainer scripts must not start services."""
    path = "/usr/sbin/policy-rc.d"
    if os.path.exists(path):
        yield
        return
    with open(path, "w") as fh:
        fh.write("#!/bin/sh\n# temporary, written by faasrm's test suite\nexit 101\n")
    os.chmod(path, 0o755)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _apt_install(packages: list[str]) -> str | None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    deadline = time.monotonic() + APT_TIMEOUT_S
    err = _run(["apt-get", "update"], timeout=APT_TIMEOUT_S / 2, env=env)
    if err:
        return err
    with _no_service_start():
        return _run(
            ["apt-get", "install", "-y", "--no-install-recommends", *packages],
            timeout=max(30.0, deadline - time.monotonic()),
            env=env,
        )


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as fh:
            return " | ".join(fh.read().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _PrivateDockerd:
    """A dockerd that touches nothing outside PRIVATE_DIR and its own socket."""

    def __init__(self) -> None:
        self.data_root = os.path.join(PRIVATE_DIR, "data")
        self.exec_root = os.path.join(PRIVATE_DIR, "exec")
        self.pidfile = os.path.join(PRIVATE_DIR, "dockerd.pid")
        self.log_path = os.path.join(PRIVATE_DIR, "dockerd.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def _kill_stale(self) -> None:
        """A dockerd of a killed earlier session still holding our pidfile (not answering)."""
        try:
            with open(self.pidfile) as fh:
                pid = int(fh.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if self.pidfile.encode() not in fh.read():
                    return
        except (OSError, ValueError):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)

    def start(self) -> str | None:
        self._kill_stale()
        shutil.rmtree(PRIVATE_DIR, ignore_errors=True)
        os.makedirs(PRIVATE_DIR, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(PRIVATE_SOCK.removeprefix("unix://"))
        cmd = [
            shutil.which("dockerd") or "dockerd",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pidfile}",
            f"--host={PRIVATE_SOCK}",
            "--bridge=none",
            "--iptables=false",
            "--ip-masq=false",
        ]
        log = open(self.log_path, "wb")  # noqa: SIM115 (dockerd keeps writing to it)
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return f"cannot run dockerd: {exc}"
        finally:
            log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"dockerd exited {self.proc.returncode}: {_log_tail(self.log_path)}"
            if _answers(PRIVATE_SOCK):
                return None
            time.sleep(0.2)
        self.stop()
        return f"dockerd not ready within {READY_TIMEOUT_S:.0f} s: {_log_tail(self.log_path)}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(PRIVATE_DIR, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(PRIVATE_SOCK.removeprefix("unix://"))


def _install_allowed() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("FAASRM_DOCKER_INSTALL") == "1"


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A reachable Docker Engine (see the module docstring), or a skip saying why not."""
    if os.environ.get("FAASRM_DOCKER") == "0":
        pytest.skip("Docker tests disabled by FAASRM_DOCKER=0")
    try:
        import docker  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"Docker tests skipped: the docker SDK is not installed ({exc})")
    t0 = time.monotonic()
    for url in (None, PRIVATE_SOCK):
        if _answers(url):
            yield DockerEngine(url, owned=False, setup_s=time.monotonic() - t0, installed=())
            return
    if os.geteuid() != 0:
        pytest.skip("Docker tests skipped: no Docker Engine answers and starting one needs root")
    engine, daemon = _start_engine(t0)  # skips with the reason when it cannot
    try:
        yield engine
    finally:
        if daemon is not None:
            daemon.stop()


def _start_engine(t0: float) -> tuple[DockerEngine, _PrivateDockerd | None]:
    """Install what is missing and start the private dockerd, one session at a time (a
    concurrent session that finds it answering shares it; only the starter stops it)."""
    with open(LOCK_FILE, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _answers(PRIVATE_SOCK):
            return DockerEngine(PRIVATE_SOCK, False, time.monotonic() - t0, ()), None
        missing = _missing_packages()
        if missing:
            if not _install_allowed():
                pytest.skip(
                    f"Docker tests skipped: {', '.join(missing)} not installed; set CI=1 or "
                    "FAASRM_DOCKER_INSTALL=1 to let the tests apt-get install them"
                )
            if shutil.which("apt-get") is None:
                pytest.skip(f"Docker tests skipped: {', '.join(missing)} missing and no apt-get")
            err = _apt_install(missing)
            if err or _missing_packages():
                pytest.skip(f"Docker tests skipped: installing {', '.join(missing)} failed: {err}")
        t_start = time.monotonic()
        daemon = _PrivateDockerd()
        err = daemon.start()
        if err:
            pytest.skip(f"Docker tests skipped: {err}")
        setup_s = time.monotonic() - (t_start if missing else t0)
        return DockerEngine(PRIVATE_SOCK, True, setup_s, tuple(missing)), daemon


def rootfs_tarball(busybox: str = BUSYBOX) -> bytes:
    """A root filesystem: /bin/busybox plus applet links, /tmp, /proc and /sys mount points."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "proc", "sys", "dev", "etc"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="session")
def busybox_image(docker_engine: DockerEngine) -> str:
    """An image imported from a busybox root filesystem (nothing can be pulled here)."""
    if not _is_static_elf(BUSYBOX):
        pytest.skip(f"Docker tests skipped: no static busybox at {BUSYBOX} (busybox-static)")
    client = _client(docker_engine.base_url)
    try:
        repo, tag = IMAGE.rsplit(":", 1)
        client.api.import_image_from_data(rootfs_tarball(), repository=repo, tag=tag)
        client.images.get(IMAGE)
    finally:
        client.close()
    return IMAGE


def client_for(engine: DockerEngine):  # noqa: ANN201
    """A docker.DockerClient for the engine (the caller closes it)."""
    return _client(engine.base_url)
