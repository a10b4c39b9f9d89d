"""``faasrm testbed up`` as a subprocess: Ctrl-C while it starts leaves nothing behind."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from testbed_helpers import cgroup_gone


def _up(nodes: int, workers: int) -> tuple[subprocess.Popen, str]:
    """``faasrm testbed up`` started, and the cgroup parent its first line names."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "testbed", "up", "--nodes", str(nodes)]
        + ["--workers", str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    found = re.search(r"cgroups under (\S+)\)", first)
    if not found:
        proc.kill()
        proc.wait()
    assert found, first
    return proc, found.group(1)


def test_ctrl_c_while_workers_start_removes_every_cgroup_and_process(v1_root: None) -> None:
    proc, parent = _up(4, 4)
    kids: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 30
        while cgroup_gone(f"{parent}/node1/fn1") and time.monotonic() < deadline:
            time.sleep(0.005)  # node0's workers are up, node1's are starting
        kids = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, [p.cmdline()[:5] for p in alive]
    assert cgroup_gone(parent), rest[-3000:]


def test_sigterm_once_up_stops_every_process_and_removes_cgroups(v1_root: None) -> None:
    proc, parent = _up(1, 2)
    kids: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        up = proc.stdout.readline()
        assert up.startswith("trainer "), up  # the trainer and the node are ready
        kids = psutil.Process(proc.pid).children(recursive=True)
        assert len(kids) >= 1 + 1 + 2  # the trainer, the sidecar, two workers
        proc.send_signal(signal.SIGTERM)  # as `timeout` or a service manager stops it
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _, alive = psutil.wait_procs(kids, timeout=10)
        for p in alive:  # what it left: the test's own cleanup
            p.kill()
    assert proc.returncode == 0, rest[-3000:]
    assert not alive, [p.cmdline()[:5] for p in alive]
    assert cgroup_gone(parent), rest[-3000:]
