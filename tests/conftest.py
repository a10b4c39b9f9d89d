"""Shared by every test directory: the real cgroup v1 prerequisite, the ``root`` marker, and
the Debian tools some tests need (chromium, promtool).

A test that needs root and writable v1 hierarchies asks for ``v1_root`` (directly or through
a fixture built on it, such as ``v1_cgroup``); that makes it skip, saying why, where it cannot
run, and marks it ``root`` so that ``-m 'not root'`` leaves it out.

Like the Docker tests (``tests/sidecar/docker_env.py``), a missing tool is apt-get installed only
when ``CI`` is set (or ``FAASRM_TOOLS_INSTALL=1``), as root; anywhere else the test skips and
says what to install. In CI an install that fails fails the test: those tests must run there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest

from sidecar import dockerd
from training.processes import v1_unavailable

ROOT_FIXTURE = "v1_root"
_refused: dict[str, str] = {}  # package -> why it could not be installed (asked once a session)


@pytest.fixture
def v1_root() -> None:
    """Skip, saying why, unless this process can create v1 cgroups."""
    reason = v1_unavailable()
    if reason:
        pytest.skip(f"real cgroup v1 test skipped: {reason}")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if isinstance(item, pytest.Function) and ROOT_FIXTURE in item.fixturenames:
            item.add_marker(pytest.mark.root)


def _install_allowed() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("FAASRM_TOOLS_INSTALL") == "1"


def need_tool(binary: str, packages: list[str], purpose: str) -> str:
    """The path of ``binary``, installing Debian ``packages`` when allowed, else pytest.skip."""
    path = shutil.which(binary)
    if path:
        return path
    key = " ".join(packages)
    if not _install_allowed():
        pytest.skip(
            f"{purpose} skipped: no {binary} here (apt-get install {key}, or set CI=1 or "
            "FAASRM_TOOLS_INSTALL=1 to let the tests install it)"
        )
    if key not in _refused:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            _refused[key] = "installing it needs root and apt-get"
        elif err := dockerd.apt_install(packages):
            _refused[key] = err
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{purpose}: cannot install {key}: {_refused.get(key, 'no ' + binary)}")
    return path


@pytest.fixture(scope="session")
def debian_tool() -> Callable[[str, list[str], str], str]:
    """``debian_tool(binary, packages, purpose)``: see ``need_tool``."""
    return need_tool
