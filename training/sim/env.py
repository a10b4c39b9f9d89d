"""Gymnasium wrapper: one step per invocation decision.

Observation: ``sidecar.core.decision.Observation`` as a dict, what the host's decision path
scores: ``context`` (node + function features, also the critic's input), the candidate blocks
``cpu`` and ``mem`` (``sidecar.core.features.expand_rows`` turns the three into the one
normalised row per candidate that the score function reads) and ``mask`` (the safeguard's
allowed candidates). Carrying blocks instead of 64 rows keeps a step cheap and rollouts small.
Action: a candidate index. The step reward is the sum of the rewards of invocations that finished
since the previous decision (an invocation's reward includes the queueing it caused others while
it ran, so it is known at its end); ``info["rewarded"]`` / ``info["rewards"]`` (and their RFETs
in ``info["rfet"]``; plain lists) name them, so a trainer can credit each reward to the decision
that caused it (``info["inv"]`` of that step). An episode that ends (``max_decisions`` or the
end of the trace) drains: every admitted invocation finishes and is rewarded by its last step.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from sidecar.core.features import N_BLOCK, N_CONTEXT
from sidecar.core.reward import RewardConfig
from training.sim.cluster import ClusterSim, Request
from training.sim.presets import Preset, get_preset

ENV_ID = "faasrm/Cluster-v0"


class ClusterEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self,
        preset: str | Preset = "small",
        reward: RewardConfig = RewardConfig(),
        fixed_seed: int | None = None,
        max_decisions: int | None = None,
    ) -> None:
        """``fixed_seed`` replays one workload every episode; otherwise each reset draws a new one.

        ``max_decisions`` ends an episode after that many decisions: no further arrivals are
        admitted, everything admitted or queued runs to completion and its rewards arrive with
        the last step. Training uses it so one rollout holds whole episodes and no reward of an
        episode is lost to the rollout boundary (the reference trained on whole episodes too).
        """
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        self.grid = self.preset.grid
        self.reward_cfg = reward
        self.fixed_seed = fixed_seed
        self.max_decisions = max_decisions
        self._decisions = 0
        n = self.grid.n
        self.observation_space = gym.spaces.Dict(
            {
                "context": gym.spaces.Box(-np.inf, np.inf, (N_CONTEXT,), np.float32),
                "cpu": gym.spaces.Box(-np.inf, np.inf, (self.grid.cpu_units, N_BLOCK), np.float32),
                "mem": gym.spaces.Box(-np.inf, np.inf, (self.grid.mem_units, N_BLOCK), np.float32),
                "mask": gym.spaces.MultiBinary(n),
            }
        )
        self.action_space = gym.spaces.Discrete(n)
        self.sim: ClusterSim | None = None
        self._req: Request | None = None

    def _obs(self, req: Request) -> dict[str, np.ndarray]:
        sim = self.sim
        assert sim is not None
        obs = sim.decider.observe(
            req.guard,
            sim.node_state(),
            req.stats,
            req.guard_state,
            req.user,
            req.now_s,
            req.input_size,
        )
        return obs._asdict()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        wl_seed = (
            self.fixed_seed if self.fixed_seed is not None else int(self.np_random.integers(2**31))
        )
        self.sim = ClusterSim(
            self.preset.build(wl_seed),
            self.preset.cluster,
            self.grid,
            self.preset.safeguard,
            self.reward_cfg,
        )
        self._decisions = 0
        self._req = self.sim.next_request()
        if self._req is None:
            raise RuntimeError("the workload has no invocations")
        return self._obs(self._req), {"inv": self._req.inv, "workload_seed": wl_seed}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        sim, req = self.sim, self._req
        if sim is None or req is None:
            raise RuntimeError("step() before reset() or after the episode ended")
        a = int(action)
        if not req.guard.mask[a]:
            raise ValueError(f"action {a} is masked out by the safeguard ({req.guard.reason})")
        sim.apply(self.grid.allocs[a])
        self._decisions += 1
        if self.max_decisions is not None and self._decisions >= self.max_decisions:
            self._req = nxt = None
        else:
            self._req = nxt = sim.next_request()
        if nxt is None:
            sim.run_to_end()
        log = sim.log
        known = sim.rewarded
        rewarded = known.copy()
        rewards = [log.reward[i] for i in known]
        rfet = [log.exec_s[i] / log.baseline_s[i] for i in known]
        known.clear()
        sim.finished.clear()
        info: dict[str, Any] = {"rewarded": rewarded, "rewards": rewards, "rfet": rfet}
        if nxt is None:
            obs = {k: np.zeros(s.shape, s.dtype) for k, s in self.observation_space.spaces.items()}
            return obs, sum(rewards), True, False, info
        info["inv"] = nxt.inv
        return self._obs(nxt), sum(rewards), False, False, info


def register() -> None:
    if ENV_ID not in gym.envs.registry:
        gym.register(ENV_ID, entry_point="training.sim.env:ClusterEnv")


register()
