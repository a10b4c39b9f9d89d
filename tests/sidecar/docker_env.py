"""A real Docker Engine for the Docker tests, or the exact reason there is none.

The engine logic lives in ``sidecar/dockerd.py`` (also used by ``faasrm bench real --runtime
docker``); these are its pytest fixtures (session scope):

* ``FAASRM_DOCKER=0`` -> skip. An engine that already answers is used as it is, never stopped.
* Otherwise, as root only, a private ``dockerd`` on ``unix:///tmp/faasrm-dockerd.sock`` (no bridge,
  no iptables), stopped and deleted at the session's end. ``docker.io`` and ``busybox-static`` are
  apt-get installed when missing only if ``CI`` is set or ``FAASRM_DOCKER_INSTALL=1``.
* Anything that fails -> ``pytest.skip`` with the reason (and the dockerd log's tail).

Images cannot be pulled here: ``busybox_image`` imports a tarball of a root filesystem holding the
static busybox and ``sh``/``sleep`` links.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar import dockerd
from sidecar.dockerd import DockerEngine

IMAGE = "faasrm-test/busybox:latest"
APPLETS = ("sh", "sleep", "true", "cat", "echo")


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
    try:
        engine = dockerd.find_or_start(install=_install_allowed(), busybox=True)
    except dockerd.EngineUnavailable as exc:
        hint = (
            "; set CI=1 or FAASRM_DOCKER_INSTALL=1 to let the tests apt-get install them"
            if exc.missing and not _install_allowed()
            else ""
        )
        pytest.skip(f"Docker tests skipped: {exc}{hint}")
    try:
        yield engine
    finally:
        engine.stop()


def rootfs_tarball(busybox: str = dockerd.BUSYBOX) -> bytes:
    """A root filesystem: /bin/busybox plus applet links, /tmp, /proc and /sys mount points."""
    dirs = [
        dockerd.TarEntry(d, "dir", mode=0o1777 if d == "tmp" else 0o755)
        for d in ("bin", "tmp", "proc", "sys", "dev", "etc")
    ]
    links = [dockerd.TarEntry(f"bin/{a}", "symlink", "busybox") for a in APPLETS]
    return dockerd.rootfs_tarball([*dirs, dockerd.TarEntry("bin/busybox", "file", busybox), *links])


@pytest.fixture(scope="session")
def busybox_image(docker_engine: DockerEngine) -> str:
    """An image imported from a busybox root filesystem (nothing can be pulled here)."""
    if not dockerd.is_static_elf(dockerd.BUSYBOX):
        pytest.skip(
            f"Docker tests skipped: no static busybox at {dockerd.BUSYBOX} (busybox-static)"
        )
    c = docker_engine.client()
    try:
        return dockerd.import_image(c, rootfs_tarball(), IMAGE)
    finally:
        c.close()


def client_for(engine: DockerEngine) -> Any:
    """A docker.DockerClient for the engine (the caller closes it)."""
    return engine.client()
