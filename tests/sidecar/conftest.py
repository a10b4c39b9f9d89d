"""Fixtures for sidecar.cgroups: a real v1 cgroup (root only, see ``v1_root`` in
tests/conftest.py) and a copied v2 file tree."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon_helpers import Box
from sidecar_helpers import v2_container

from sidecar import cgroups

ROOT = cgroups.DEFAULT_ROOT
TEST_PARENT = "faasrm-test"


def _kill_all(cg: cgroups.CgroupV1, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pids = cg.pids()
        except cgroups.CgroupGone:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


@pytest.fixture
def v1_cgroup(v1_root: None) -> Iterator[cgroups.CgroupV1]:
    """A fresh cgroup faasrm-test/<uuid> in the v1 cpu, cpuacct and memory hierarchies."""
    rel = f"{TEST_PARENT}/{uuid.uuid4().hex[:12]}"
    try:
        cg = cgroups.create_v1(rel, ROOT)
    except cgroups.CgroupError as exc:
        pytest.skip(f"real cgroup v1 test skipped: cannot create a cgroup: {exc}")
    try:
        yield cg
    finally:
        cg.close()
        _kill_all(cg)
        cgroups.remove_v1(rel, ROOT)
        for controller in cgroups.V1_CONTROLLERS:
            try:
                os.rmdir(os.path.join(ROOT, controller, TEST_PARENT))
            except OSError as exc:  # other tests' cgroups still in it, or already gone
                assert exc.errno in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY), exc


Spawn = Callable[[str], subprocess.Popen[str]]


@pytest.fixture
def spawn(v1_cgroup: cgroups.CgroupV1) -> Iterator[Spawn]:
    """Start ``python -c code`` inside ``v1_cgroup`` (stdin/stdout are text pipes).

    The child writes its own pid into cgroup.procs of the three hierarchies before exec, so all
    of the interpreter's CPU time and memory are charged to the test cgroup.
    """
    started: list[subprocess.Popen[str]] = []

    def start(code: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=cgroups.join_in_child(v1_cgroup),  # noqa: PLW1509 (one test thread)
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


@pytest.fixture
def boxes(v1_cgroup: cgroups.CgroupV1) -> Iterator[Callable[[str], Box]]:
    """``boxes(name)``: a child cgroup of ``v1_cgroup`` with a worker process in it."""
    made: dict[str, Box] = {}

    def make(name: str) -> Box:
        b = made[name] = Box(f"{v1_cgroup.rel_path}/{name}")
        return b

    yield make
    for b in made.values():
        b.close()


@pytest.fixture
def v2_tree(tmp_path: Path) -> Path:
    """A writable copy of tests/fixtures/cgroupfs/v2 (one container's v2 cgroup directory)."""
    return v2_container(tmp_path, "container")
