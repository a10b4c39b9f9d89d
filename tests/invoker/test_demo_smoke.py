"""``faasrm demo`` as a subprocess: the table is printed, the trainer got trajectories, and
nothing is left behind (trainer, sidecar, workers, cgroups), also after Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[2]


MARK = "FAASRM_DEMO_SMOKE"
"""An environment variable every process the demo starts inherits: what tells its processes
from other tests' or tools' workers running on the same machine."""


def _leftovers(pid: int, mark: str) -> tuple[list[str], list[str]]:
    """The demo's cgroups and its workers, sidecars and trainer still present."""
    cgs = [
        str(p)
        for c in ("cpu", "cpuacct", "memory")
        for p in Path("/sys/fs/cgroup", c).glob(f"faasrm-real-{pid}-*")
    ]
    procs = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ours = f"{MARK}={mark}".encode() in env
            if ours and (b"training.invoker.worker" in cmd or b"faasrm-real-" in cmd):
                procs.append(cmd.decode(errors="replace"))
    return cgs, procs


def _demo(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """The demo started with its own ``MARK`` value (returned)."""
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            "--json",
            str(tmp_path / "demo.json"),
            "--plots",
            str(tmp_path),
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, MARK: mark},
    )
    return proc, mark


def test_demo_short_run_prints_table_and_cleans_up(v1_root: None, tmp_path: Path) -> None:
    proc, mark = _demo(tmp_path, "--minutes", "0.15")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "gmean RFET" in out and "/debug/allocations" in out, out
    assert "One round" in out  # and how far a one-round result can be trusted
    assert (tmp_path / "real_rfet_cdf.png").stat().st_size > 0
    rows = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert "fixed" in rows and "learned" in rows, out
    out_json = json.loads((tmp_path / "demo.json").read_text())
    results = out_json["results"]
    # the demo's trainer received the learned run's trajectories from the sidecar's shipper
    assert out_json["trainer"]["records"] > 0, out_json.get("trainer")
    assert "trajectory records" in out
    assert out_json["config"]["grid"]["cpu_unit_cores"] == 0.25  # models/invoker.onnx's grid
    for key in (
        "mean_rfet",
        "p98_rfet",
        "p98_duration_s",
        "harvested_frac",
        "accelerated_frac",
        "slowdown_frac_1_2",
        "failures",
        "invocations",
        "oom_kills",
        "give_backs",
    ):
        assert key in results["learned"], key
    assert results["learned"]["invocations"] > 0 and results["fixed"]["invocations"] > 0
    assert out_json["noise"] is None and out_json["config"]["repeats"] == 1
    assert results["learned"]["verdict"] in ("faster", "slower", "indistinguishable")
    assert _leftovers(proc.pid, mark) == ([], [])


def test_demo_ctrl_c_leaves_nothing_behind(v1_root: None, tmp_path: Path) -> None:
    # a worker of another run on this machine, alive throughout: not the demo's leftover
    other = subprocess.Popen(
        [sys.executable, "-m", "training.invoker.worker", "sleepy"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        proc, mark = _demo(tmp_path, "--minutes", "1")
        time.sleep(8)  # containers up, the Fixed replay running
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (out, err[-3000:])
        assert other.poll() is None
        assert _leftovers(proc.pid, mark) == ([], [])
    finally:
        other.kill()
        other.wait()
