"""Shared helpers for the sidecar daemon tests: tiny ONNX policies, refs, samples, v2 trees."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from sidecar.core.features import FEATURE_VERSION, FEATURES, N_FEATURES, schema_hash
from sidecar.core.grid import ResourceGrid
from sidecar.runtimes.base import ContainerRef, UserSize
from sidecar.sampler import Sample
from sidecar.units import MB

COL = {f.name: i for i, f in enumerate(FEATURES)}
GRID = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
V2_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cgroupfs" / "v2"


def onnx_policy(
    kind: str = "harvest", grid: ResourceGrid | None = GRID, metadata: bool = True
) -> bytes:
    """A linear ONNX scorer ``rows @ W (+ b)``.

    kinds: ``harvest`` (prefers the smallest candidate: -cand_cpu - cand_mem), ``user`` (prefers
    the user's size), ``nan`` (every score NaN), ``wrong_shape`` (two scores per row),
    ``nan_when_busy`` (``user``, but NaN for every row once ``pending`` >= 12: it passes the
    probe checks, which see 3 pending, and fails at run time).
    """
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    cols = 2 if kind == "wrong_shape" else 1
    w = np.zeros((N_FEATURES, cols), np.float32)
    if kind in ("user", "nan_when_busy"):
        w[COL["cand_cpu_vs_user"]] = w[COL["cand_mem_vs_user"]] = -1.0
    else:
        w[COL["cand_cpu"]] = w[COL["cand_mem"]] = -1.0
    b = np.full((cols,), math.nan if kind == "nan" else 0.0, np.float32)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("MatMul", ["rows", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["z"]),
        helper.make_node("Reshape", ["z", "flat"], ["scores"]),
    ]
    if kind == "nan_when_busy":  # pending is encoded log1p(x) / 5: 11 -> 0.497, 12 -> 0.513
        inits += [
            numpy_helper.from_array(np.array(COL["pending"], dtype=np.int64), "col"),
            numpy_helper.from_array(np.array(0.505, dtype=np.float32), "busy"),
            numpy_helper.from_array(np.array(math.nan, dtype=np.float32), "nan"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        ]
        nodes[-1].output[0] = "base"
        nodes += [
            helper.make_node("Gather", ["rows", "col"], ["pending"], axis=1),
            helper.make_node("Greater", ["pending", "busy"], ["is_busy"]),
            helper.make_node("Where", ["is_busy", "nan", "zero"], ["poison"]),
            helper.make_node("Add", ["base", "poison"], ["scores"]),
        ]
    graph = helper.make_graph(
        nodes,
        "policy",
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["M"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        meta = {"feature_version": str(FEATURE_VERSION), "schema_hash": schema_hash()}
        if grid is not None:
            meta["grid"] = json.dumps(dataclasses.asdict(grid), sort_keys=True)
        helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model.SerializeToString()


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
