"""PPO: learns an obvious preference, resumes, never samples masked actions, exports to numpy."""

from __future__ import annotations

import csv
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from sidecar.core.features import N_BLOCK, N_CONTEXT, N_FEATURES, expand_rows
from sidecar.core.policy import MLPScorer, fallback_scorer
from training.ppo import Agent, Args, build_rows, load_checkpoint, make_env, train

CU, MU = 4, 2


class BiggestCpuEnv(gym.Env):
    """Same observation layout as ClusterEnv; reward 1 iff the chosen candidate has the largest
    CPU value (column 0 of the CPU block) among the allowed candidates. Every decision is an
    invocation that finishes at once (info["rewarded"] carries it, like ClusterEnv)."""

    def __init__(self, episode_len: int = 32) -> None:
        self.episode_len = episode_len
        self.observation_space = gym.spaces.Dict(
            {
                "context": gym.spaces.Box(-np.inf, np.inf, (N_CONTEXT,), np.float32),
                "cpu": gym.spaces.Box(-np.inf, np.inf, (CU, N_BLOCK), np.float32),
                "mem": gym.spaces.Box(-np.inf, np.inf, (MU, N_BLOCK), np.float32),
                "mask": gym.spaces.MultiBinary(CU * MU),
            }
        )
        self.action_space = gym.spaces.Discrete(CU * MU)

    def _draw(self) -> dict[str, np.ndarray]:
        r = self.np_random
        mask = r.random(CU * MU) < 0.7
        mask[r.integers(CU * MU)] = True
        self._obs = {
            "context": r.normal(0, 1, N_CONTEXT).astype(np.float32),
            "cpu": r.uniform(0, 1, (CU, N_BLOCK)).astype(np.float32),
            "mem": r.uniform(0, 1, (MU, N_BLOCK)).astype(np.float32),
            "mask": mask,
        }
        return self._obs

    def best(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        cand = np.repeat(obs["cpu"][:, 0], MU)
        return np.flatnonzero(obs["mask"] & (cand == cand[obs["mask"]].max()))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self._draw(), {"inv": 0}

    def step(self, action):
        assert self._obs["mask"][action], "a masked action was taken"
        r = float(int(action) in self.best(self._obs))
        inv = self._t
        self._t += 1
        done = self._t >= self.episode_len
        info = {"rewarded": np.array([inv]), "rewards": np.array([r])}
        obs = self._draw()
        if not done:
            info["inv"] = self._t
        return obs, r, done, False, info


def _greedy_accuracy(agent: Agent, n: int = 400, seed: int = 123) -> float:
    env = BiggestCpuEnv()
    env.reset(seed=seed)
    hits = 0
    for _ in range(n):
        o = env._draw()
        t = {k: torch.as_tensor(v[None]) for k, v in o.items()}
        with torch.no_grad():
            logits = agent.masked_logits(t["context"], t["cpu"], t["mem"], t["mask"])
        hits += int(int(logits.argmax()) in env.best(o))
    return hits / n


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _toy_args(tmp: Path, **kw) -> Args:
    base = dict(
        total_timesteps=4 * 64 * 40,
        num_envs=4,
        num_steps=64,
        learning_rate=3e-3,
        ent_coef=0.0,
        num_minibatches=4,
        out_dir=str(tmp),
        progress=False,
        seed=0,
    )
    base.update(kw)
    return Args(**base)


def test_learns_obvious_preference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    assert _greedy_accuracy(Agent()) < 0.7  # chance level is well below 0.9
    out = train(_toy_args(tmp_path), env_fn=lambda i: BiggestCpuEnv())
    acc = _greedy_accuracy(out["agent"])
    assert acc > 0.9, acc
    rows = _read_csv(out["csv"])
    assert len(rows) == 40
    reward = [float(r["charts/mean_step_reward"]) for r in rows]
    ent = [float(r["losses/entropy"]) for r in rows]
    assert np.mean(reward[-5:]) > np.mean(reward[:5]) + 0.2
    assert np.mean(ent[-5:]) < np.mean(ent[:5])  # the policy sharpens
    assert float(rows[-1]["charts/dropped_reward_frac"]) == 0.0
    assert float(rows[-1]["charts/episodes"]) > 0


def test_resume_continues(tmp_path: Path) -> None:
    env_fn = lambda i: BiggestCpuEnv()  # noqa: E731
    a1 = _toy_args(tmp_path, total_timesteps=4 * 32 * 3, num_steps=32, checkpoint_every=1)
    out1 = train(a1, env_fn=env_fn)
    assert out1["iteration"] == 3 and out1["global_step"] == 4 * 32 * 3
    ck = load_checkpoint(out1["checkpoint"])
    assert ck["iteration"] == 3 and ck["global_step"] == 4 * 32 * 3
    assert {"agent", "optimizer", "args", "rng"} <= set(ck)
    a2 = _toy_args(tmp_path, total_timesteps=4 * 32 * 6, num_steps=32, resume=out1["checkpoint"])
    out2 = train(a2, env_fn=env_fn)
    assert out2["iteration"] == 6 and out2["global_step"] == 4 * 32 * 6
    rows = _read_csv(out2["csv"])
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [int(r["global_step"]) for r in rows] == [4 * 32 * k for k in range(1, 7)]
    # the annealed LR continues from the resumed iteration, not from the start
    assert float(rows[3]["charts/learning_rate"]) < float(rows[0]["charts/learning_rate"])


def test_masked_actions_never_sampled() -> None:
    torch.manual_seed(0)
    agent = Agent()
    with torch.no_grad():  # strong scores so masked candidates would often win if unmasked
        agent.actor[-1].weight.normal_(0, 5.0)
    b = 64
    rng = np.random.default_rng(0)
    ctx = torch.randn(b, N_CONTEXT)
    cpu = torch.randn(b, CU, N_BLOCK)
    mem = torch.randn(b, MU, N_BLOCK)
    mask = torch.as_tensor(rng.random((b, CU * MU)) < 0.3)
    mask[:, 0] = False
    mask[torch.arange(b), torch.as_tensor(rng.integers(1, CU * MU, b))] = True
    for _ in range(50):
        with torch.no_grad():
            a, logp, ent, v = agent.get_action_and_value(ctx, cpu, mem, mask)
        assert bool(mask[torch.arange(b), a].all())
        assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
        assert v.shape == (b, 1)
    # a single allowed candidate: always chosen, log-prob 0, and gradients stay finite
    one = torch.zeros(b, CU * MU, dtype=torch.bool)
    one[:, 3] = True
    a, logp, ent, _ = agent.get_action_and_value(ctx, cpu, mem, one)
    assert (a == 3).all() and torch.allclose(logp, torch.zeros(b), atol=1e-6)
    (logp.sum() + ent.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in agent.actor.parameters())


def test_rows_match_expand_rows_and_mlp_scorer() -> None:
    torch.manual_seed(1)
    agent = Agent()
    with torch.no_grad():
        agent.actor[-1].weight.normal_(0, 1.0)
    rng = np.random.default_rng(1)
    ctx = rng.normal(size=(5, N_CONTEXT)).astype(np.float32)
    cpu = rng.normal(size=(5, CU, N_BLOCK)).astype(np.float32)
    mem = rng.normal(size=(5, MU, N_BLOCK)).astype(np.float32)
    rows_np = expand_rows(ctx, cpu, mem)
    rows_t = build_rows(torch.from_numpy(ctx), torch.from_numpy(cpu), torch.from_numpy(mem))
    assert rows_t.shape == (5, CU * MU, N_FEATURES)
    np.testing.assert_array_equal(rows_t.numpy(), rows_np)

    scorer = MLPScorer(*agent.actor_mlp_weights())
    with torch.no_grad():
        ref = agent.scores(rows_t).numpy()
    np.testing.assert_allclose(scorer.scores(rows_np), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(scorer.scores_blocks(ctx, cpu, mem), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["sample"])
def test_train_on_cluster_env_smoke(tmp_path: Path, preset: str) -> None:
    out = train(
        Args(
            preset=preset,
            total_timesteps=2 * 64 * 2,
            num_envs=2,
            num_steps=64,
            out_dir=str(tmp_path),
            progress=False,
        )
    )
    assert out["global_step"] == 256
    rows = _read_csv(out["csv"])
    assert len(rows) == 2
    keys = rows[0].keys()
    assert {
        "charts/episodic_return",
        "losses/policy_loss",
        "losses/entropy",
        "sim/mean_rfet",
    } <= keys
    assert 0.0 < float(rows[-1]["sim/mean_rfet"]) < 10.0
    assert Path(out["checkpoint"]).exists()


def test_envs_decide_under_the_named_memory_margin() -> None:
    """``Args.mem_margin_units`` reaches the envs' safeguard: driven by the same actions (the
    user-size rule, allowed in both boxes), the tight box allows every candidate the reference's
    allows, and more."""
    rule = fallback_scorer("user")
    masks: dict[float, list[np.ndarray]] = {}
    for margin in (1.0, 0.25):
        env = make_env(Args(preset="small", mem_margin_units=margin), 0, None)()
        obs, _ = env.reset(seed=3)
        masks[margin] = []
        for _ in range(400):
            mask = obs["mask"].astype(bool)
            masks[margin].append(mask)
            scores = rule.scores(expand_rows(obs["context"], obs["cpu"], obs["mem"]))
            obs, _, term, trunc, _ = env.step(int(np.argmax(np.where(mask, scores, -np.inf))))
            assert not (term or trunc)
    wide = narrow = 0
    for tight, ref in zip(masks[0.25], masks[1.0], strict=True):
        assert (tight | ref == tight).all()  # a superset
        wide += int(tight.sum())
        narrow += int(ref.sum())
    assert wide > narrow


def test_rewards_known_at_the_end_of_invocations_are_all_credited(tmp_path: Path) -> None:
    """The simulator rewards an invocation when it finishes (with the queueing it caused): with
    episodes of num_steps decisions that drain at their end, every reward reaches its decision
    within the rollout (the ledger drops none)."""
    out = train(
        Args(
            preset="small",
            total_timesteps=2 * 128 * 2,
            num_envs=2,
            num_steps=128,
            episode_decisions=128,
            out_dir=str(tmp_path),
            progress=False,
        )
    )
    rows = _read_csv(out["csv"])
    assert len(rows) == 2
    assert all(float(r["charts/dropped_reward_frac"]) == 0.0 for r in rows)
    assert all(float(r["charts/episodes"]) == 2 for r in rows)


def test_the_ledger_credits_every_simulated_reward_once_to_its_decision() -> None:
    from training.ppo import CreditInfo, CreditLedger
    from training.sim.env import ClusterEnv

    n = 150
    env = CreditInfo(ClusterEnv(preset="small", max_decisions=n))
    obs, info = env.reset(seed=5)
    ledger = CreditLedger(1)
    ledger.start_rollout(0)
    rewards = torch.zeros(n, 1)
    decided = {}
    for step in range(n):
        ledger.decided([info["inv"]], step)
        decided[info["inv"]] = step
        obs, _, term, _, info = env.step(int(np.flatnonzero(obs["mask"])[-1]))
        ledger.credit(rewards, [info["credit"]], [info.get("episode")])
        if term:
            break
    assert term and step == n - 1
    log = env.unwrapped.sim.log
    assert ledger.credited == n and ledger.dropped == 0
    for inv, s in decided.items():  # each decision's row holds its own invocation's reward
        assert float(rewards[s, 0]) == pytest.approx(log.reward[inv], rel=1e-6, abs=1e-6)


def test_a_last_minibatch_of_one_decision_leaves_the_agent_finite(tmp_path: Path) -> None:
    """5 decisions in minibatches of 2 leave a last one of 1: its advantage has no spread to
    normalise by (std() of one value is NaN), and one NaN loss makes every weight NaN."""
    args = _toy_args(tmp_path, total_timesteps=10, num_envs=1, num_steps=5, num_minibatches=2)
    out = train(args, env_fn=lambda i: BiggestCpuEnv())
    assert all(torch.isfinite(p).all() for p in out["agent"].parameters())
    assert np.isfinite(float(out["losses/policy_loss"]))


def test_more_minibatches_than_decisions_is_refused_before_training(tmp_path: Path) -> None:
    """A minibatch size of 0 crashed deep in the first update with a range error."""
    args = Args(preset="sample", num_envs=1, num_steps=4, num_minibatches=8)
    args.out_dir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="num_minibatches 8 must be 1..4"):
        train(args)
    assert not (tmp_path / "run").exists()
