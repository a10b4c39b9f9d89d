"""Ray rollouts: RayVectorEnv matches SyncVectorEnv step for step, and PPO trains through it.

Runs against a private local Ray instance; skipped where Ray is not installed (it is the optional
``faasrm[ray]`` extra, not part of ``dev``).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

ray = pytest.importorskip(
    "ray",
    reason="Ray is not importable here (optional extra, not in dev: pip install 'faasrm[ray]')",
    exc_type=ImportError,
)

from training.ppo import Args, CreditInfo, _split_infos, train  # noqa: E402
from training.ray_envs import RayVectorEnv  # noqa: E402
from training.sim.env import ClusterEnv  # noqa: E402

N_ENVS = 2
DECISIONS = 64
STEPS = 130  # crosses the episode boundary at step 64 (and 128)


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


def _thunks() -> list:
    # lambdas travel to the Ray workers by value (this test module is not importable there)
    return [
        lambda: CreditInfo(ClusterEnv("sample", fixed_seed=0, max_decisions=DECISIONS))
        for _ in range(N_ENVS)
    ]


def assert_same(a, b, path="infos"):
    """Deep equality over the nested dict / tuple / ndarray (incl. object array) structure."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{a.shape} vs {b.shape}"
        if a.dtype == object:
            for i, (x, y) in enumerate(zip(a, b)):
                assert_same(x, y, f"{path}[{i}]")
        else:
            np.testing.assert_array_equal(a, b, err_msg=path)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_ray_vector_env_matches_sync(local_ray):
    mode = gym.vector.AutoresetMode.SAME_STEP
    sync = gym.vector.SyncVectorEnv(_thunks(), autoreset_mode=mode)
    renv = RayVectorEnv(_thunks(), address="local", autoreset_mode=mode)
    try:
        assert renv.single_observation_space == sync.single_observation_space
        assert renv.action_space == sync.action_space
        o_s, i_s = sync.reset(seed=3)
        o_r, i_r = renv.reset(seed=3)
        assert_same(o_s, o_r, "obs")
        assert_same(i_s, i_r)
        rng = np.random.default_rng(0)
        episodes = 0
        for t in range(STEPS):
            # a random allowed candidate per env (the safeguard's mask is part of the obs)
            actions = np.array([rng.choice(np.flatnonzero(m)) for m in o_s["mask"]])
            o_s, r_s, te_s, tr_s, i_s = sync.step(actions)
            o_r, r_r, te_r, tr_r, i_r = renv.step(actions)
            assert_same(o_s, o_r, f"obs@{t}")
            assert_same((r_s, te_s, tr_s), (r_r, te_r, tr_r), f"reward/term/trunc@{t}")
            assert_same(i_s, i_r, f"infos@{t}")
            c_s, e_s = _split_infos(i_s, N_ENVS)
            c_r, e_r = _split_infos(i_r, N_ENVS)
            assert all(c is not None for c in c_r), f"a step without credit at {t}"
            assert_same((c_s, e_s), (c_r, e_r), f"credit/episode@{t}")
            episodes += sum(e is not None for e in e_r)
        assert episodes == 2 * N_ENVS  # both envs crossed two episode boundaries (64, 128)
    finally:
        sync.close()
        renv.close()
    assert ray.is_initialized(), "RayVectorEnv shut down a Ray instance it did not start"


def test_train_with_ray(local_ray, tmp_path: Path):
    out = train(
        Args(
            preset="sample",
            total_timesteps=256,
            num_envs=2,
            num_steps=64,
            episode_decisions=64,
            ray_address="local",
            out_dir=str(tmp_path),
            progress=False,
        )
    )
    with open(out["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert int(rows[-1]["global_step"]) == 256
    assert int(rows[-1]["charts/episodes"]) == 2  # one 64-decision episode per env per rollout
    assert np.isfinite(float(rows[-1]["charts/episodic_return"]))
    assert Path(out["checkpoint"]).exists()
