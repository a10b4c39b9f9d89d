"""Tiny linear ONNX scorers whose behaviour is known in advance, and an ``Agent`` with one.

They are what the tests load, swap and publish, and what ``faasrm bench faults`` publishes as bad
models: each is ``rows @ W (+ b)`` over the feature schema of ``sidecar.core.features``, stamped
with its feature version, schema hash and (optionally) grid like an export, so a node validates
it exactly as it validates a trained policy. ``largest_agent`` is the ``largest`` rule as a
``training.ppo.Agent``: a checkpoint the online learner can start from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING

import numpy as np

from sidecar.core.features import FEATURE_VERSION, FEATURES, N_FEATURES, schema_hash
from sidecar.core.grid import ResourceGrid

if TYPE_CHECKING:
    from training.ppo import Agent

KINDS = ("harvest", "user", "largest", "fast_small", "nan", "wrong_shape", "nan_when_busy")
COL = {f.name: i for i, f in enumerate(FEATURES)}


def onnx_policy(kind: str, grid: ResourceGrid | None, metadata: bool = True) -> bytes:
    """A linear ONNX scorer for ``grid`` (None: no grid in its metadata).

    kinds: ``harvest`` (prefers the smallest candidate: -cand_cpu - cand_mem), ``user`` (the
    daemon's ``rule``: the candidate closest to the user's size), ``largest`` (the largest:
    cand_cpu + cand_mem), ``fast_small`` (the most CPU with the least memory: cand_cpu -
    cand_mem), ``nan`` (every score NaN), ``wrong_shape`` (two scores per row),
    ``nan_when_busy`` (``user``, but NaN for every row once ``pending`` >= 12: it passes the
    probe checks, which see 3 pending, and fails at run time).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    cols = 2 if kind == "wrong_shape" else 1
    w = np.zeros((N_FEATURES, cols), np.float32)
    if kind in ("user", "nan_when_busy"):
        w[COL["cand_cpu_vs_user"]] = w[COL["cand_mem_vs_user"]] = -1.0
    elif kind in ("largest", "fast_small"):
        w[COL["cand_cpu"]] = 1.0
        w[COL["cand_mem"]] = 1.0 if kind == "largest" else -1.0
    else:
        w[COL["cand_cpu"]] = w[COL["cand_mem"]] = -1.0
    b = np.full((cols,), math.nan if kind == "nan" else 0.0, np.float32)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(b, "b"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    # ``user`` scores -(|log2 cpu/user| + |log2 mem/user|), as the daemon's ``rule`` does
    closest = kind in ("user", "nan_when_busy")
    nodes = [
        *([helper.make_node("Abs", ["rows"], ["abs_rows"])] if closest else []),
        helper.make_node("MatMul", ["abs_rows" if closest else "rows", "W"], ["mm"]),
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


def largest_agent() -> Agent:
    """A ``training.ppo.Agent`` whose actor ranks candidates as ``largest`` does: one path of
    its tanh layers carries cand_cpu + cand_mem (kept in tanh's steep part), the rest is zero, so
    the score rises with the candidate's size. Its critic is the usual initialisation."""
    import torch

    from training.ppo import Agent

    agent = Agent()
    first, second, out = (m for m in agent.actor if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        for layer in (first, second, out):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[0, COL["cand_cpu"]] = first.weight[0, COL["cand_mem"]] = 0.5
        second.weight[0, 0] = 1.0
        out.weight[0, 0] = 20.0
    return agent
