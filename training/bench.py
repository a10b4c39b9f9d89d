"""Benchmarks that print figures (never timed unit tests): ``faasrm bench sim`` lives here.

Figures are reported beside a baseline run on the same machine and workload, as a ratio.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np


def bench_sim(
    preset: str = "paper",
    seed: int = 0,
    decisions: int = 60_000,
    n_envs: int = 16,
    model: str | Path | None = None,
) -> dict[str, float | str]:
    """Decisions/s of ``n_envs`` Gymnasium envs in lockstep, a 32/16 tanh MLP scoring every
    candidate of every pending decision in one batched call (as a vectorised rollout runs).

    The MLP is the shipped policy's weights (``model``, default ``models/``), or, when there is
    none or a host would refuse it, random weights in numpy (these over-allocate, so the
    simulated cluster runs saturated: a slower, pessimistic regime). Baseline for the ratio: the
    same loop with the user's size chosen (no features, no policy). One core: BLAS threads
    pinned to 1.
    """
    import gymnasium as gym

    from sidecar.core.features import N_FEATURES
    from sidecar.core.policy import MLPScorer, sample_batch
    from sidecar.models import default_model_path
    from training.baselines import Fixed
    from training.sim.cluster import ClusterSim
    from training.sim.env import ENV_ID
    from training.sim.presets import get_preset

    p = get_preset(preset)
    envs = [
        gym.make(ENV_ID, preset=p, fixed_seed=seed + i, disable_env_checker=True)
        for i in range(n_envs)
    ]
    path = Path(model) if model else default_model_path(p.grid)
    score = MLPScorer.random(N_FEATURES, (32, 16), seed=seed).scores_blocks
    policy = "random-mlp"
    if path.exists():
        from sidecar.models import ModelRejected, validate
        from training.export import mlp_from_onnx

        try:
            validate(path.read_bytes(), p.grid, None)
        except ModelRejected as exc:  # another feature schema or grid: it would score garbage
            policy = f"random-mlp ({path.name} refused: {exc})"
        else:
            score = mlp_from_onnx(path).scores_blocks
            policy = f"{path.name} (weights in numpy)"
    rng = np.random.default_rng(seed)
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    n = 0
    t0 = time.perf_counter()
    while n < decisions:
        # One batched policy call for all environments, as a vectorised rollout does.
        scores = score(
            np.stack([o["context"] for o in obs]),
            np.stack([o["cpu"] for o in obs]),
            np.stack([o["mem"] for o in obs]),
        )
        actions, _ = sample_batch(scores, np.stack([o["mask"] for o in obs]), rng)
        for i, env in enumerate(envs):
            o, _, term, _, _ = env.step(int(actions[i]))
            obs[i] = env.reset()[0] if term else o
        n += n_envs
    policy_s = time.perf_counter() - t0

    sim = ClusterSim(p.build(seed), p.cluster, p.grid)
    fixed = Fixed()
    m = 0
    t0 = time.perf_counter()
    while m < decisions:
        req = sim.next_request()
        if req is None:
            sim.reset()
            continue
        sim.apply(fixed.decide(sim, req))
        m += 1
    fixed_s = time.perf_counter() - t0
    dps = n / policy_s
    return {
        "decisions_per_s": dps,
        "baseline_fixed_decisions_per_s": m / fixed_s,
        "ratio_vs_fixed": dps / (m / fixed_s),
        "ratio_vs_reference_400": dps / 400.0,
        "policy": policy,
    }


def write_json(figures: dict[str, float], path: str | Path | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def single_core() -> None:
    """Pin BLAS pools to one thread so a 'one core' figure means one core."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
