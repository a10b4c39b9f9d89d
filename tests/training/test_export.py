"""ONNX export of the PPO actor: parity with torch, self-contained file, metadata, no torch at
serve time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sidecar.core.features import FEATURE_VERSION, N_FEATURES, schema_hash
from sidecar.core.policy import OnnxScorer
from training.export import code_version, env_rows, export, parity_check, read_metadata
from training.ppo import Agent, Args
from training.sim.presets import get_preset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Agent, Path, dict]:
    torch.manual_seed(3)
    agent = Agent()
    # make the actor's output non-trivial (the last layer is initialised near zero)
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0, 1.0)
    d = tmp_path_factory.mktemp("onnx") / "sub"
    path = d / "policy.onnx"
    meta = export(agent, path, args=Args(preset="sample"))
    return agent, path, meta


def test_parity_random_and_env_rows(exported) -> None:
    agent, path, _ = exported
    errs = parity_check(agent, path, preset="sample")
    assert set(errs) == {"random", "random_1", "env"}
    assert max(errs.values()) <= 1e-5
    # explicitly, on several random batch sizes (dynamic N)
    scorer = OnnxScorer(path)
    rng = np.random.default_rng(0)
    for n in (1, 7, 64, 300):
        rows = rng.normal(0, 2, (n, N_FEATURES)).astype(np.float32)
        with torch.no_grad():
            ref = agent.scores(torch.from_numpy(rows)).numpy()
        got = scorer.scores(rows)
        assert got.shape == (n,)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    rows = env_rows("sample", n_obs=8, seed=1)
    assert rows.shape[1] == N_FEATURES and rows.shape[0] == 8 * get_preset("sample").grid.n
    with torch.no_grad():
        ref = agent.scores(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(scorer.scores(rows), ref, atol=1e-5, rtol=0)


def test_self_contained_and_loads_from_bytes(exported) -> None:
    _, path, meta = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["policy.onnx", "policy.onnx.json"]
    data = path.read_bytes()
    scorer = OnnxScorer(data)
    assert scorer.scores(np.zeros((3, N_FEATURES), np.float32)).shape == (3,)
    import hashlib

    side = json.loads((Path(str(path) + ".json")).read_text())
    assert side["sha256"] == hashlib.sha256(data).hexdigest() == meta["sha256"]


def test_metadata(exported) -> None:
    _, path, _ = exported
    md = read_metadata(path)
    assert md["feature_version"] == str(FEATURE_VERSION)
    assert md["schema_hash"] == schema_hash()
    grid = json.loads(md["grid"])
    assert grid["cpu_units"] * grid["mem_units"] == get_preset("sample").grid.n
    assert json.loads(md["training_config"])["preset"] == "sample"
    from importlib.metadata import version

    import sidecar

    assert md["code_version"] == (getattr(sidecar, "__version__", None) or version("faasrm"))
    assert md["code_version"] == code_version()
    assert md["created"]
    side = json.loads((Path(str(path) + ".json")).read_text())
    for k, v in md.items():
        assert side[k] == v


def test_serving_does_not_import_torch(exported) -> None:
    _, path, _ = exported
    code = (
        "import sys, numpy as np\n"
        "from sidecar.core.policy import OnnxScorer\n"
        "from sidecar.core.features import N_FEATURES\n"
        f"s = OnnxScorer({str(path)!r})\n"
        "out = s.scores(np.ones((5, N_FEATURES), np.float32))\n"
        "assert out.shape == (5,)\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_export_from_checkpoint(tmp_path: Path) -> None:
    from training.ppo import save_checkpoint

    agent = Agent()
    opt = torch.optim.Adam(agent.parameters())
    args = Args(preset="sample", seed=7)
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, agent, opt, 1, 10, args)
    meta = export(ckpt, tmp_path / "m.onnx")
    assert json.loads(meta["training_config"])["seed"] == 7
    assert parity_check(agent, tmp_path / "m.onnx")["env"] <= 1e-5


def test_mlp_from_onnx_scores_like_onnxruntime(tmp_path):
    import numpy as np

    from sidecar.core.features import N_FEATURES
    from sidecar.core.policy import OnnxScorer
    from training.export import export, mlp_from_onnx
    from training.ppo import Agent

    path = tmp_path / "p.onnx"
    export(Agent(), path, args={"preset": "sample"})
    rows = np.random.default_rng(0).normal(size=(64, N_FEATURES)).astype(np.float32)
    np.testing.assert_allclose(
        mlp_from_onnx(path).scores(rows), OnnxScorer(path).scores(rows), atol=1e-5
    )


def test_a_behaviour_cloning_checkpoint_exports_for_its_own_preset(tmp_path: Path) -> None:
    """``training.pretrain`` records its preset, so the export is for that preset's grid; a
    checkpoint without training args is refused by name instead of guessing a grid (it read
    ``small``'s, or failed with KeyError 'args')."""
    from training import pretrain
    from training.ppo import agent_from_checkpoint

    bc = tmp_path / "bc.pt"
    pretrain.main(
        ["--preset", "sample", "--episodes", "1", "--decisions", "64", "--epochs", "1"]
        + ["--out", str(bc)]
    )
    meta = export(bc, tmp_path / "bc.onnx")
    assert json.loads(meta["training_config"])["preset"] == "sample"
    bare = tmp_path / "bare.pt"
    torch.save({"agent": Agent().state_dict()}, bare)
    with pytest.raises(ValueError, match="records no training args"):
        agent_from_checkpoint(bare)
