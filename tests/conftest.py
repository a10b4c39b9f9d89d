"""Shared by every test directory: the real cgroup v1 prerequisite and the ``root`` marker.

A test that needs root and writable v1 hierarchies asks for ``v1_root`` (directly or through
a fixture built on it, such as ``v1_cgroup``); that makes it skip, saying why, where it cannot
run, and marks it ``root`` so that ``-m 'not root'`` leaves it out.
"""

from __future__ import annotations

import os

import pytest

from sidecar import cgroups

ROOT_FIXTURE = "v1_root"


def v1_unavailable(root: str = cgroups.DEFAULT_ROOT) -> str | None:
    """Why real v1 cgroup tests cannot run here, or None if they can."""
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
