"""Export the PPO actor to one self-contained ONNX file the sidecar scores with.

The graph maps ``rows`` float32 [N, N_FEATURES] (dynamic N) to ``scores`` [N]. The file carries
metadata_props (feature_version, schema_hash, grid, training config, code version, created time);
``<path>.json`` holds the same plus the sha256 of the ONNX bytes.

Usage: ``python -m training.export runs/checkpoint.pt models/policy.onnx``
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

import sidecar
from sidecar.core.features import FEATURE_VERSION, N_FEATURES, expand_rows, schema_hash
from sidecar.core.grid import ResourceGrid
from sidecar.core.policy import ONNX_INPUT, ONNX_OUTPUT, MLPScorer
from training.ppo import Agent, ScoreNet, agent_from_checkpoint

OPSET = 17


def code_version() -> str:
    """The faasrm code version stamped into every export."""
    return sidecar.__version__


def _config_dict(args: Any) -> dict:
    if args is None:
        return {}
    if dataclasses.is_dataclass(args):
        return dataclasses.asdict(args)
    return dict(args)


def export(
    source: str | Path | Agent,
    path: str | Path,
    args: Any = None,
    grid: ResourceGrid | None = None,
) -> dict:
    """Write the actor of ``source`` (a checkpoint path or an Agent) to ``path``; returns metadata.

    ``args`` (an ``Args`` or dict) defaults to the checkpoint's; ``grid`` to the preset's grid.
    """
    if isinstance(source, Agent):
        agent = source
    else:
        agent, ckpt_args = agent_from_checkpoint(source)
        args = args if args is not None else ckpt_args
    config = _config_dict(args)
    if grid is None:
        from training.sim.presets import get_preset

        grid = get_preset(config.get("preset", "small")).grid

    net = ScoreNet(agent.actor).eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deliberate
        torch.onnx.export(
            net,
            (torch.zeros(grid.n, N_FEATURES),),
            buf,
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "N"}, ONNX_OUTPUT: {0: "N"}},
            opset_version=OPSET,
            dynamo=False,
        )
    import onnx

    model = onnx.load_from_string(buf.getvalue())
    meta = {
        "feature_version": str(FEATURE_VERSION),
        "schema_hash": schema_hash(),
        "grid": json.dumps(dataclasses.asdict(grid), sort_keys=True),
        "training_config": json.dumps(config, sort_keys=True, default=str),
        "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    data = model.SerializeToString()  # weights inline: one self-contained file (tiny model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    out = {**meta, "sha256": hashlib.sha256(data).hexdigest(), "onnx": path.name}
    Path(str(path) + ".json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file, via onnxruntime (no torch, no onnx needed)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)


def env_rows(preset: str = "sample", n_obs: int = 32, seed: int = 0) -> np.ndarray:
    """Real candidate rows from ``n_obs`` decisions of the preset's env (user-size actions)."""
    from training.sim.env import ClusterEnv

    env = ClusterEnv(preset=preset)
    obs, _ = env.reset(seed=seed)
    rows = []
    for _ in range(n_obs):
        rows.append(expand_rows(obs["context"], obs["cpu"], obs["mem"]))
        allowed = np.flatnonzero(obs["mask"])
        obs, _, term, trunc, _ = env.step(int(allowed[len(allowed) // 2]))
        if term or trunc:
            obs, _ = env.reset()
    return np.concatenate(rows).astype(np.float32)


def parity_check(
    agent: Agent, onnx_path: str | Path, preset: str = "sample", atol: float = 1e-5, seed: int = 0
) -> dict[str, float]:
    """Max |onnxruntime - torch| on random rows and on real env rows; raises over ``atol``."""
    from sidecar.core.policy import OnnxScorer

    scorer = OnnxScorer(Path(onnx_path).read_bytes())
    rng = np.random.default_rng(seed)
    batches = {
        "random": rng.normal(0, 1, (257, N_FEATURES)).astype(np.float32),
        "random_1": rng.normal(0, 1, (1, N_FEATURES)).astype(np.float32),
        "env": env_rows(preset, seed=seed),
    }
    out = {}
    with torch.no_grad():
        for name, rows in batches.items():
            ref = agent.scores(torch.from_numpy(rows)).numpy()
            got = scorer.scores(rows)
            err = float(np.max(np.abs(ref - got)))
            if got.shape != ref.shape or not err <= atol:
                raise AssertionError(f"ONNX/torch parity failed on {name}: max err {err}")
            out[name] = err
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="export a PPO checkpoint's actor to ONNX")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--parity-preset", default="sample")
    a = p.parse_args(argv)
    meta = export(a.checkpoint, a.out)
    agent, _ = agent_from_checkpoint(a.checkpoint)
    meta["parity_max_err"] = parity_check(agent, a.out, a.parity_preset)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()


def mlp_from_onnx(path: str | Path) -> MLPScorer:
    """The exported actor's Gemm/Tanh chain as a numpy ``MLPScorer`` (same scores).

    The simulator's fast path scores candidate blocks in numpy (``scores_blocks``) instead of
    building 64 rows per decision for onnxruntime; this reads the weights back out of the file.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ws, bs = [], []
    for node in model.graph.node:
        if node.op_type != "Gemm":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        w = init[node.input[1]]
        ws.append(w.T if attrs.get("transB", 0) else w)
        bs.append(init[node.input[2]])
    if not ws:
        raise ValueError(f"{path}: no Gemm layers (not an exported faasrm actor)")
    return MLPScorer(ws, bs)
