"""``faasrm bench trainer`` runs end to end and writes every figure (no timing assertions: the
figures belong to a quiet machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from training.bench_trainer import KEYS


def test_bench_trainer_writes_ingest_healthz_under_flood_and_propagation(
    tmp_path: Path, v1_root: None
) -> None:
    """(``v1_root``: the propagation figure runs a one-node testbed on real cgroups.)"""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "bench", "trainer", "--nodes", "1"]
        + ["--batches", "4", "--batch-records", "50", "--flood-batches", "2"]
        + ["--flood-records", "500", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert list(figures) == list(KEYS)
    assert all(math.isfinite(v) and v > 0 for v in figures.values()), figures
    assert "/healthz under a flood: p99" in proc.stdout
