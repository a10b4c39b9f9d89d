"""Find a Docker Engine, or install and start a private one; import images from root filesystems.

Used by the Docker tests (``tests/sidecar/docker_env.py`` wraps it in pytest fixtures) and by the
local invoker's Docker containers (``faasrm bench real --runtime docker``): both need an engine on
hosts that have none running, and neither can pull images (no registry access).

Order of attempts (:func:`find_or_start`):

1. An engine that already answers (``DOCKER_HOST`` or the default socket, then this module's own
   socket left by a concurrent user) is used as it is and never stopped.
2. Otherwise, as root only: if ``dockerd`` (or, when asked for, a static busybox) is missing,
   install ``docker.io`` (``busybox-static``) with apt-get -- only when the caller allows it
   (apt-get update first, time-boxed; a temporary policy-rc.d, unless one exists, keeps the package
   from starting the system dockerd). Then start a private ``dockerd`` with everything under
   ``/tmp/faasrm-dockerd`` (data root, exec root, pidfile, log), listening only on
   ``unix:///tmp/faasrm-dockerd.sock``, with no bridge and no iptables rules (containers run with
   ``--network none``), wait <= 30 s for it; :meth:`DockerEngine.stop` stops it and deletes its
   files.
3. Anything that fails raises :class:`EngineUnavailable` with the reason (and the dockerd log's
   tail).
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

PRIVATE_DIR = "/tmp/faasrm-dockerd"
PRIVATE_SOCK = "unix:///tmp/faasrm-dockerd.sock"
LOCK_FILE = "/tmp/faasrm-dockerd.lock"
READY_TIMEOUT_S = 30.0
APT_TIMEOUT_S = 240.0  # inside pytest-timeout's 300 s (which counts fixture setup)
BUSYBOX = "/bin/busybox"


class EngineUnavailable(Exception):
    """No engine can be had; ``missing`` names the packages an install would have needed."""

    def __init__(self, reason: str, missing: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.missing = missing


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
        """Start and wait until it answers; None on success, else why not."""
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
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches its user, who stops it in order
            )
        except OSError as exc:
            return f"cannot run dockerd: {exc}"
        finally:
            log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"dockerd exited {self.proc.returncode}: {_log_tail(self.log_path)}"
            if answers(PRIVATE_SOCK):
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


@dataclass(frozen=True)
class DockerEngine:
    """An engine that answers; ``stop()`` stops it if (and only if) it was started here."""

    base_url: str | None  # None: docker.from_env() (DOCKER_HOST or the default socket)
    setup_s: float  # time to get it (install excluded when nothing was installed)
    installed: tuple[str, ...]  # Debian packages apt-get installed for it
    daemon: _PrivateDockerd | None = field(default=None, repr=False, compare=False)

    @property
    def owned(self) -> bool:
        """Started by this process (stopped by ``stop()``); else shared and left running."""
        return self.daemon is not None

    def client(self, timeout: float = 10.0) -> Any:
        """A ``docker.DockerClient`` for the engine (the caller closes it)."""
        return client(self.base_url, timeout)

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()


def client(base_url: str | None, timeout: float = 10.0) -> Any:
    """A ``docker.DockerClient``; ``base_url`` None = ``docker.from_env()``."""
    import docker

    if base_url:
        return docker.DockerClient(base_url=base_url, timeout=timeout)
    return docker.from_env(timeout=timeout)


def answers(base_url: str | None) -> bool:
    """Whether an engine answers a ping there (quickly: 3 s at most)."""
    try:
        c = client(base_url, timeout=3)
    except Exception:  # noqa: BLE001 (no socket, bad DOCKER_HOST, ...)
        return False
    try:
        return bool(c.ping())
    except Exception:  # noqa: BLE001
        return False
    finally:
        c.close()


def is_static_elf(path: str) -> bool:
    """True for an ELF without a PT_INTERP program header (runs in an empty root filesystem)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
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


def missing_packages(busybox: bool) -> list[str]:
    """Debian packages needed for a private engine (and a static busybox, if asked) not here."""
    missing = []
    if shutil.which("dockerd") is None:
        missing.append("docker.io")
    if busybox and not is_static_elf(BUSYBOX):
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
        fh.write("#!/bin/sh\n# temporary, written by faasrm (sidecar/dockerd.py)\nexit 101\n")
    os.chmod(path, 0o755)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def apt_install(packages: list[str]) -> str | None:
    """apt-get update and install ``packages`` (root), starting no service; None on success,
    else why it failed. Also used by the tests that need Debian's chromium or promtool in CI."""
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


def find_or_start(
    *, install: bool, busybox: bool = False, echo: Callable[[str], None] = lambda _msg: None
) -> DockerEngine:
    """An engine that answers (see the module docstring); raises EngineUnavailable.

    ``install``: apt-get install what is missing (root only). ``busybox``: a static busybox is
    needed too (the tests' images hold it). ``echo`` is told before anything slow happens."""
    t0 = time.monotonic()
    for url in (None, PRIVATE_SOCK):
        if answers(url):
            return DockerEngine(url, time.monotonic() - t0, ())
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker Engine answers and starting one needs root")
    with open(LOCK_FILE, "w") as lock:  # one starter at a time; the others share its engine
        fcntl.flock(lock, fcntl.LOCK_EX)
        if answers(PRIVATE_SOCK):
            return DockerEngine(PRIVATE_SOCK, time.monotonic() - t0, ())
        missing = missing_packages(busybox)
        if missing:
            if not install:
                raise EngineUnavailable(f"{', '.join(missing)} not installed", tuple(missing))
            if shutil.which("apt-get") is None:
                raise EngineUnavailable(
                    f"{', '.join(missing)} missing and no apt-get", tuple(missing)
                )
            echo(f"installing {', '.join(missing)} with apt-get")
            err = apt_install(missing)
            if err or missing_packages(busybox):
                raise EngineUnavailable(
                    f"installing {', '.join(missing)} failed: {err}", tuple(missing)
                )
        t_start = time.monotonic()
        echo(f"starting a private dockerd on {PRIVATE_SOCK}")
        daemon = _PrivateDockerd()
        err = daemon.start()
        if err:
            raise EngineUnavailable(err)
        setup_s = time.monotonic() - (t_start if missing else t0)
        return DockerEngine(PRIVATE_SOCK, setup_s, tuple(missing), daemon)


@dataclass(frozen=True)
class TarEntry:
    """One member of a root filesystem tarball: a directory, a symlink or a host file."""

    name: str
    kind: str  # "dir", "symlink" or "file"
    target: str = ""  # the symlink's target or the host file to copy
    mode: int = 0o755


def rootfs_tarball(entries: Iterable[TarEntry]) -> bytes:
    """A root filesystem as an uncompressed tarball, for ``import_image``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for e in entries:
            if e.kind == "file":
                tar.add(e.target, arcname=e.name)
                continue
            info = tarfile.TarInfo(e.name)
            info.mode = e.mode
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target
            else:
                raise ValueError(f"unknown tar entry kind {e.kind!r}")
            tar.addfile(info)
    return buf.getvalue()


def import_image(docker_client: Any, tarball: bytes, image: str) -> str:
    """Import a root filesystem as ``image`` (``repo:tag``) unless it exists: nothing can be
    pulled on hosts without registry access. Returns the image's name."""
    import docker.errors

    try:
        docker_client.images.get(image)
        return image
    except docker.errors.ImageNotFound:
        pass
    repo, tag = image.rsplit(":", 1)
    docker_client.api.import_image_from_data(tarball, repository=repo, tag=tag)
    docker_client.images.get(image)  # raises if the import did not produce it
    return image


__all__ = [
    "PRIVATE_SOCK",
    "DockerEngine",
    "EngineUnavailable",
    "TarEntry",
    "answers",
    "apt_install",
    "client",
    "find_or_start",
    "import_image",
    "is_static_elf",
    "missing_packages",
    "rootfs_tarball",
]
