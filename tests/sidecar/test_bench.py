"""``faasrm bench sidecar`` runs end to end on real cgroups and writes every figure (no timing
assertions: the figures belong to a quiet machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from sidecar.bench import KEYS


def test_bench_sidecar_writes_every_mix_beside_its_raw_read_baseline(
    tmp_path: Path, v1_cgroup
) -> None:
    """(``v1_cgroup``: the bench needs what it needs, root and writable v1 hierarchies, or the
    test skips saying why.)"""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "bench", "sidecar", "--ticks", "2"]
        + ["--decisions", "205", "--actuations", "3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert list(figures) == list(KEYS)
    for mix in ("100", "1000", "100_all_active"):
        for key in (f"tick_cpu_pct_{mix}", f"raw_read_cpu_pct_{mix}"):
            assert key in figures and math.isfinite(figures[key]) and figures[key] >= 0, key
    assert "1000 containers, 10% running" in proc.stdout
