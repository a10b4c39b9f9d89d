"""Docker-backed containers for the local invoker (``faasrm bench real --runtime docker``).

A container is a real Docker container, created through the Docker SDK, named as OpenWhisk names
action containers (``wsk<invoker>_<n>_guest_<function>``, the invoker part being the run's parent
name without its dashes) so that the sidecar's Docker runtime (``sidecar/runtimes/docker.py``)
discovers it, maps it to ``guest/<function>`` and reads the user's size from its HostConfig:
CFS quota/period = the user's cores, CPU shares = 1024 x cores (the weight of the bare-cgroup
containers), memory = memory+swap = the user's MB (no swap). The sidecar's hooks name it by its
Docker id.

Nothing can be pulled on this host, so the image is imported from a tiny root filesystem (mount
points, and the host's ``/bin -> usr/bin``-style links) and the worker runs the host's Python:
``/usr``, the Python installation (``sys.base_prefix``), the venv (``sys.prefix``) and the repo are
bind-mounted read-only at their own paths. The container has no network (``network_mode=none``).
It runs ``python -m training.invoker.worker NAME`` with stdin open; the invoker speaks the worker's
JSON-line protocol over the container's attach socket (the SDK's ``attach_socket``, attached
before the start so the ready line is not missed; stdout frames are demultiplexed from Docker's
8-byte-header stream format). A worker that dies is a container that exited: ``State.OOMKilled``
tells whether the kernel killed it for memory, and the same container is started again (same id,
so the sidecar keeps its identity). ``stop()`` removes the container (force).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from sidecar import cgroups
from sidecar.dockerd import DockerEngine, TarEntry, import_image, rootfs_tarball
from sidecar.runtimes.docker import cgroup_rel_path
from sidecar.units import MB
from training.invoker.functions import DEFAULT_RATIO, FunctionSpec
from training.invoker.invoker import WORKER_ENV, WorkerContainer

REPO = Path(__file__).resolve().parents[2]
IMAGE = "faasrm-invoker/rootfs:1"
NAMESPACE = "guest"  # OpenWhisk's default namespace: the sidecar maps names to guest/<function>
PARENT_LABEL = "faasrm.invoker.parent"  # the run that made the container (leftover checks)
_STDOUT = 1  # stream type in the attach stream's frame headers (0 stdin, 1 stdout, 2 stderr)
_TOP_LINKS = ("bin", "lib", "lib64", "sbin")  # often symlinks into /usr (merged /usr)
_image_lock = threading.Lock()  # containers start concurrently: import the image once


def sanitize(name: str) -> str:
    """What OpenWhisk keeps of a name in container names: letters, digits and ``_``."""
    return re.sub(r"[^A-Za-z0-9_]", "", name)


def host_mounts() -> list[str]:
    """Host directories the worker needs, mounted read-only at the same paths (nested ones
    dropped): /usr, the top-level library directories that are not links into it, the Python
    installation, the venv and the repo."""
    wanted = [
        "/usr",
        *(f"/{t}" for t in _TOP_LINKS if os.path.isdir(f"/{t}") and not os.path.islink(f"/{t}")),
        sys.base_prefix,
        sys.prefix,
        str(REPO),
    ]
    paths = sorted({os.path.realpath(p) for p in wanted})
    return [p for p in paths if not any(p.startswith(q + "/") for q in paths if q != p)]


def image_tarball() -> bytes:
    """The image's root filesystem: mount points plus the host's top-level links into /usr."""
    entries = [
        TarEntry(d, "dir", mode=0o1777 if d == "tmp" else 0o755)
        for d in ("tmp", "proc", "sys", "dev", "etc")
    ]
    entries += [
        TarEntry(t, "symlink", os.readlink(f"/{t}")) for t in _TOP_LINKS if os.path.islink(f"/{t}")
    ]
    return rootfs_tarball(entries)


def leftovers(engine: DockerEngine, parent_prefix: str) -> list[str]:
    """Names of containers made by runs whose parent starts with ``parent_prefix`` still there."""
    client = engine.client()
    try:
        found = client.api.containers(all=True, filters={"label": PARENT_LABEL})
    finally:
        client.close()
    return [
        c["Names"][0].lstrip("/")
        for c in found
        if c["Labels"].get(PARENT_LABEL, "").startswith(parent_prefix)
    ]


class DockerContainer(WorkerContainer):
    """One function's Docker container on ``engine`` (see the module docstring)."""

    def __init__(
        self,
        engine: DockerEngine,
        parent: str,
        seq: int,
        spec: FunctionSpec,
        ratio: float = DEFAULT_RATIO,
    ) -> None:
        super().__init__(spec, ratio)
        self.engine = engine
        self.parent = parent
        invoker = re.sub(r"[^A-Za-z0-9]", "", parent)  # the name's invoker part has no "_"
        self.docker_name = f"wsk{invoker}_{seq}_{NAMESPACE}_{sanitize(spec.name)}"
        self.id: str | None = None
        self.ooms = 0  # exits with State.OOMKilled (the cgroup and its counter go with the exit)
        self._client: Any = None  # one SDK client per container: they are not shared by threads
        self._cgroup_rel = ""
        self._cgroup_version = 1
        self._attach: Any = None  # the SDK's socket wrapper, kept so it outlives the stream
        self._demux: asyncio.Task[None] | None = None
        self.stderr_tail = b""  # the worker's last stderr bytes (tracebacks)

    @property
    def sidecar_id(self) -> str:
        assert self.id is not None, "not started"
        return self.id  # the Docker runtime's id: the full container id

    async def start(self) -> None:
        self._client = self.engine.client()
        await asyncio.to_thread(self._create)
        await self._spawn()

    def _create(self) -> None:
        with _image_lock:
            import_image(self._client, image_tarball(), IMAGE)
        info = self._client.info()
        self._cgroup_version = 2 if str(info.get("CgroupVersion", "1")) == "2" else 1
        lim = self.user_limits
        host_config = self._client.api.create_host_config(
            mounts=[_ro_bind(p) for p in host_mounts()],
            network_mode="none",
            cpu_period=lim.cpu_period_us,
            cpu_quota=round(self.user_cpu * lim.cpu_period_us),
            cpu_shares=cgroups.weight_to_shares(lim.cpu_weight),
            mem_limit=int(self.user_mem_mb * MB),
            memswap_limit=int(self.user_mem_mb * MB),
        )
        created = self._client.api.create_container(
            IMAGE,
            [sys.executable, "-m", "training.invoker.worker", self.spec.name],
            name=self.docker_name,
            stdin_open=True,
            working_dir=str(REPO),
            environment={**WORKER_ENV, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"},
            labels={PARENT_LABEL: self.parent},
            host_config=host_config,
        )
        self.id = created["Id"]
        # No CgroupParent: the engine's default place (docker/<id> with the cgroupfs driver).
        self._cgroup_rel = cgroup_rel_path(self.id, info.get("CgroupDriver") or "cgroupfs")

    async def _spawn(self) -> None:
        assert self.id is not None
        self._attach = await asyncio.to_thread(
            self._client.api.attach_socket,
            self.id,
            params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1},
        )
        # The SDK returns a SocketIO over the hijacked connection; asyncio needs the socket.
        sock: socket.socket = self._attach._sock
        reader, self._stdin = await asyncio.open_connection(sock=sock)
        self._stdout = asyncio.StreamReader()
        self._demux = asyncio.create_task(self._demultiplex(reader, self._stdout))
        await asyncio.to_thread(self._client.api.start, self.id)
        if self.cg is not None:  # a restart: the engine made the cgroup anew
            self.cg.close()
        self.cg = cgroups.open_cgroup(self._cgroup_rel, version=self._cgroup_version)
        try:
            await self._ready()
        except RuntimeError as exc:  # the stream ended: everything it said is in stderr_tail
            raise RuntimeError(f"{exc}; stderr: {self.stderr_tail[-1000:]!r}") from None

    async def _demultiplex(self, reader: asyncio.StreamReader, out: asyncio.StreamReader) -> None:
        """Docker's attach stream (no TTY): frames of [stream, 0, 0, 0, size (4 bytes BE)] + data;
        stdout goes to ``out``, stderr to ``stderr_tail``. EOF = the container exited."""
        try:
            while True:
                head = await reader.readexactly(8)
                data = await reader.readexactly(int.from_bytes(head[4:8], "big"))
                if head[0] == _STDOUT:
                    out.feed_data(data)
                else:
                    self.stderr_tail = (self.stderr_tail + data)[-2000:]
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            out.feed_eof()

    async def _kill(self) -> None:
        import docker.errors

        try:
            await asyncio.to_thread(self._client.api.kill, self.id)
        except docker.errors.APIError:
            pass  # not running any more

    async def _wait_exit(self) -> int | None:
        """Make sure the container is down (a broken stream on a live one included), then read
        its exit code and whether the kernel OOM-killed it."""
        await self._kill()
        await asyncio.to_thread(self._client.api.wait, self.id)
        state = (await asyncio.to_thread(self._client.api.inspect_container, self.id))["State"]
        if state.get("OOMKilled"):
            self.ooms += 1
        await self._close_stream()
        return state.get("ExitCode")

    def oom_kills(self) -> int:
        return self.ooms

    async def _close_stream(self) -> None:
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None
        if self._demux is not None:
            await asyncio.gather(self._demux, return_exceptions=True)
            self._demux = None
        if self._attach is not None:
            self._attach.close()
            self._attach = None

    async def stop(self) -> None:
        import docker.errors

        if self._client is None:
            return
        try:
            if self.id is not None:
                try:
                    await asyncio.to_thread(self._client.api.remove_container, self.id, force=True)
                except docker.errors.NotFound:
                    pass
            await self._close_stream()
            if self.cg is not None:
                self.cg.close()
                self.cg = None
        finally:
            self._client.close()
            self._client = None


def _ro_bind(path: str) -> Any:
    import docker.types

    return docker.types.Mount(path, path, type="bind", read_only=True)


__all__ = ["IMAGE", "DockerContainer", "host_mounts", "image_tarball", "leftovers", "sanitize"]
