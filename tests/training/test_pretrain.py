"""Behaviour cloning warm start: the teacher respects the safeguard and is learnable."""

from __future__ import annotations

import numpy as np

from training.pretrain import collect, fit, teacher_action
from training.sim.env import ClusterEnv


def test_teacher_is_the_oracle_clipped_into_the_safeguard_ranges():
    """The teacher is ``BoxedOracle`` (manager ``oracle_in_box``): per resource, the Oracle's
    choice clamped into the guard's range."""
    env = ClusterEnv("sample", fixed_seed=0)
    obs, _ = env.reset(seed=0)
    clipped = 0
    for _ in range(200):
        a = teacher_action(env)
        assert obs["mask"][a]
        best = env.sim.oracle_alloc(env._req.inv)
        chosen = env.grid.alloc(a)
        g = env._req.guard
        assert chosen.cpu == min(max(best.cpu, g.cpu_lo), g.cpu_hi)
        assert chosen.mem == min(max(best.mem, g.mem_lo), g.mem_hi)
        clipped += chosen != best
        obs, _, done, _, _ = env.step(a)
        if done:
            break
    assert clipped > 0  # first invocations are calibration runs at the user's size


def test_cloning_learns_to_agree_with_the_teacher():
    data = collect("small", episodes=2, decisions=400, seed=4)
    assert len(data["action"]) == 800
    assert data["mask"][np.arange(800), data["action"]].all()
    # An untrained (near-constant) scorer picks the first allowed candidate: the smallest.
    _, untrained = fit(data, epochs=0, lr=1e-3, seed=0)
    _, trained = fit(data, epochs=80, lr=3e-3, seed=0)
    assert trained > max(0.9, untrained + 0.04)
