"""Shared helpers for the sidecar daemon tests: tiny ONNX policies, refs, samples, v2 trees."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sidecar.core.grid import ResourceGrid
from sidecar.runtimes.base import ContainerRef, UserSize
from sidecar.sampler import Sample
from sidecar.units import MB
from training import linear_policies

GRID = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
V2_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cgroupfs" / "v2"


def onnx_policy(
    kind: str = "harvest", grid: ResourceGrid | None = GRID, metadata: bool = True
) -> bytes:
    """``training.linear_policies.onnx_policy`` on the tests' grid (skips without onnx)."""
    pytest.importorskip("onnx")
    return linear_policies.onnx_policy(kind, grid, metadata)


def write_policy(path: Path, kind: str = "harvest", **kw) -> Path:
    path.write_bytes(onnx_policy(kind, **kw))
    return path


def ref(
    cid: str = "fn@1",
    function: str = "fn",
    cpu: float = 2.0,
    mem_mb: float = 512,
    version: int = 1,
    path: str | None = None,
) -> ContainerRef:
    return ContainerRef(
        cid,
        function,
        "test",
        path or cid,
        version,  # type: ignore[arg-type]
        UserSize(cpu, int(mem_mb * MB)),
    )


def sample(
    cid: str,
    t: float,
    cpu: float = 0.1,
    mem_mb: float = 10.0,
    oom_delta: int = 0,
    peak_mb: float = -1,
) -> Sample:
    return Sample(
        cid,
        t,
        cpu,
        0.1,
        int(mem_mb * MB),
        int(peak_mb * MB) if peak_mb >= 0 else -1,
        oom_delta,
        oom_delta,
        0,
        None,
    )


def v2_container(parent: Path, name: str) -> Path:
    """A copy of the v2 fixture tree as ``parent/name`` (a container directory)."""
    dest = parent / name
    shutil.copytree(V2_FIXTURE, dest)
    return dest
