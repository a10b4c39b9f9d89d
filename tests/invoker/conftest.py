"""Shared fixture of the invoker tests: they create real cgroups (root, writable v1 hierarchies)."""

from __future__ import annotations

import os

import pytest

from sidecar import cgroups


@pytest.fixture
def v1_root() -> None:
    """Skip, saying why, unless this process can create v1 cgroups."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    for c in cgroups.V1_CONTROLLERS:
        if not os.access(os.path.join(cgroups.DEFAULT_ROOT, c), os.W_OK):
            pytest.skip(f"no writable cgroup v1 '{c}' hierarchy")
