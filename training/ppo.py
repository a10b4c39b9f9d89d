"""PPO for the score-function policy (CleanRL-style, one readable file).

The actor is ONE small network applied to every candidate row (context + candidate columns, laid
out exactly as ``sidecar.core.features.expand_rows``); its masked scores are the logits of one
categorical action, so the exported actor is the scorer the sidecar runs. The critic is a separate
MLP over the context vector only.

Credit assignment: the reward of an invocation belongs to the decision that allocated it, not to
the step at which its outcome became known. The trainer keeps, per env, a map ``inv -> rollout
step`` and adds each rewarded invocation's reward to that step. The simulator reports an
invocation's reward when it starts (its execution time is known then), so only invocations still
waiting in the admission queue when a rollout ends lose their reward (a known approximation;
``charts/dropped_reward_frac`` logs the share).

Usage: ``python -m training.ppo --preset small --total-timesteps 200000`` (every ``Args`` field is
a ``--flag``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.distributions.categorical import Categorical

from sidecar.core.features import N_CONTEXT, N_FEATURES

MASKED_LOGIT = -1e9
"""Logit given to masked-out candidates: exp() underflows to exactly 0 in float32, no NaN."""


@dataclass
class Args:
    exp_name: str = "ppo"
    """the name of this experiment (used in the output directory name)"""
    preset: str = "small"
    """the simulation preset (training.sim.presets) the envs draw workloads from"""
    seed: int = 1
    """seed of the experiment (torch, numpy, python, env i gets seed + i)"""
    torch_deterministic: bool = True
    """toggles torch.backends.cudnn.deterministic / deterministic algorithms where cheap"""
    total_timesteps: int = 200_000
    """total decisions (env steps over all envs) of the experiment"""
    num_envs: int = 4
    """the number of parallel environments"""
    async_envs: bool = False
    """use gymnasium AsyncVectorEnv (subprocesses) instead of SyncVectorEnv"""
    ray_address: str | None = None
    """Ray cluster address ('auto', 'ray://host:10001') or 'local'; when set, rollouts run in
    Ray actors"""
    num_steps: int = 1024
    """the number of steps to run in each environment per policy rollout"""
    episode_decisions: int | None = 1024
    """decisions per training episode (None: a whole trace); equal to num_steps, every rollout
    holds whole episodes, so no invocation's reward is lost to a rollout boundary"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    anneal_lr: bool = True
    """toggle learning rate annealing for policy and value networks"""
    gamma: float = 0.5
    """the discount factor gamma (low: each reward is credited to its own decision; the short
    horizon still charges a decision for the queueing it causes the next few invocations)"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    norm_adv: bool = True
    """toggles advantages normalization"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = True
    """toggles whether or not to use a clipped loss for the value function"""
    ent_coef: float = 0.01
    """coefficient of the entropy"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float | None = None
    """the target KL divergence threshold (None: no early stop)"""
    checkpoint_every: int = 10
    """save a checkpoint every this many iterations (0: only at the end)"""
    out_dir: str = "runs"
    """directory for the CSV log and checkpoints"""
    resume: str | None = None
    """path of a checkpoint to resume from (continues the iteration count and global step)"""
    init_from: str | None = None
    """start the actor from this checkpoint's weights (e.g. training.pretrain's behaviour clone)"""
    progress: bool = True
    """show a live progress bar (rich)"""

    # filled at runtime
    batch_size: int = 0
    """the batch size (computed in runtime: num_envs * num_steps)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime: total_timesteps // batch_size)"""


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias_const: float = 0.0) -> nn.Linear:
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


def build_rows(ctx: torch.Tensor, cpu: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
    """Torch twin of ``expand_rows``: rows[b, i * mu + j] = concat(ctx[b], cpu[b, i], mem[b, j])."""
    b, cu, mu = ctx.shape[0], cpu.shape[-2], mem.shape[-2]
    rows = torch.cat(
        (
            ctx[:, None, None, :].expand(b, cu, mu, ctx.shape[-1]),
            cpu[:, :, None, :].expand(b, cu, mu, cpu.shape[-1]),
            mem[:, None, :, :].expand(b, cu, mu, mem.shape[-1]),
        ),
        dim=-1,
    )
    return rows.reshape(b, cu * mu, rows.shape[-1])


class ScoreNet(nn.Module):
    """rows [N, N_FEATURES] -> scores [N]: the module exported to ONNX."""

    def __init__(self, actor: nn.Sequential) -> None:
        super().__init__()
        self.actor = actor

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.actor(rows).squeeze(-1)


class Agent(nn.Module):
    def __init__(self, n_features: int = N_FEATURES, n_context: int = N_CONTEXT) -> None:
        super().__init__()
        self.actor = nn.Sequential(
            layer_init(nn.Linear(n_features, 32)),
            nn.Tanh(),
            layer_init(nn.Linear(32, 16)),
            nn.Tanh(),
            layer_init(nn.Linear(16, 1), std=0.01),
        )
        self.critic = nn.Sequential(
            layer_init(nn.Linear(n_context, 32)),
            nn.Tanh(),
            layer_init(nn.Linear(32, 16)),
            nn.Tanh(),
            layer_init(nn.Linear(16, 1), std=1.0),
        )

    def get_value(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.critic(ctx)

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        return self.actor(rows).squeeze(-1)

    def masked_logits(
        self, ctx: torch.Tensor, cpu: torch.Tensor, mem: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        logits = self.scores(build_rows(ctx, cpu, mem))
        return torch.where(mask.bool(), logits, torch.full_like(logits, MASKED_LOGIT))

    def get_action_and_value(
        self,
        ctx: torch.Tensor,
        cpu: torch.Tensor,
        mem: torch.Tensor,
        mask: torch.Tensor,
        action: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = Categorical(logits=self.masked_logits(ctx, cpu, mem, mask))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(ctx)

    def actor_mlp_weights(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(weights, biases) for ``sidecar.core.policy.MLPScorer``: weights as (in, out)
        matrices."""
        linears = [m for m in self.actor if isinstance(m, nn.Linear)]
        ws = [m.weight.detach().cpu().numpy().T.astype(np.float32).copy() for m in linears]
        bs = [m.bias.detach().cpu().numpy().astype(np.float32).copy() for m in linears]
        return ws, bs


class CreditInfo(gym.Wrapper):
    """Repackages an env's per-step info so a vector env can batch it.

    ``info["credit"] = (inv_decided_now, rewarded_ids, rewards, rfets)`` as one
    tuple (object-batched), and ``info["episode"]`` with return / length / mean RFET at the end
    of an episode. An env without ``info["rewarded"]`` gets its step reward credited to the step
    itself (a synthetic ``inv`` per step).
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._inv = -1
        self._ret = 0.0
        self._len = 0
        self._rfet: list[float] = []
        self._synthetic = 0

    def _decided(self, info: dict) -> int:
        if "inv" in info:
            return int(info["inv"])
        self._synthetic += 1
        return self._synthetic

    def reset(self, **kw: Any):
        obs, info = self.env.reset(**kw)
        self._inv = self._decided(info)
        self._ret, self._len, self._rfet = 0.0, 0, []
        return obs, {"inv": self._inv}

    def step(self, action):
        obs, reward, term, trunc, info = self.env.step(action)
        decided = self._inv
        if "rewarded" in info:
            ids = np.asarray(info["rewarded"], dtype=np.int64)
            rews = np.asarray(info["rewards"], dtype=np.float64)
        else:
            ids, rews = np.array([decided], dtype=np.int64), np.array([reward], dtype=np.float64)
        rfet = np.asarray(info.get("rfet", ()), dtype=np.float64)
        self._rfet.extend(rfet[np.isfinite(rfet)].tolist())
        self._ret += float(reward)
        self._len += 1
        out: dict[str, Any] = {"credit": (decided, ids, rews, rfet)}
        if term or trunc:
            out["episode"] = {
                "r": self._ret,
                "l": self._len,
                "rfet": float(np.mean(self._rfet)) if self._rfet else float("nan"),
            }
        else:
            self._inv = out["inv"] = self._decided(info)
        return obs, reward, term, trunc, out


def make_env(
    args: Args, idx: int, env_fn: Callable[[int], gym.Env] | None
) -> Callable[[], gym.Env]:
    def thunk() -> gym.Env:
        if env_fn is not None:
            env = env_fn(idx)
        else:
            from training.sim.env import ClusterEnv  # each reset draws a new workload

            env = ClusterEnv(preset=args.preset, max_decisions=args.episode_decisions)
        return CreditInfo(env)

    return thunk


def _split_infos(infos: dict, num_envs: int) -> tuple[list[tuple | None], list[dict | None]]:
    """Per env: this step's credit tuple and, when an episode ended, its episode stats."""
    credit: list[tuple | None] = [None] * num_envs
    episode: list[dict | None] = [None] * num_envs
    final = infos.get("final_info", {})
    for i in range(num_envs):
        if "_final_info" in infos and infos["_final_info"][i]:
            credit[i] = final["credit"][i]
            episode[i] = {k: final["episode"][k][i] for k in ("r", "l", "rfet")}
        elif "_credit" in infos and infos["_credit"][i]:
            credit[i] = infos["credit"][i]
    return credit, episode


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def save_checkpoint(
    path: Path,
    agent: Agent,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    global_step: int,
    args: Args,
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "agent": agent.state_dict(),
            "optimizer": optimizer.state_dict(),
            "iteration": iteration,
            "global_step": global_step,
            "args": asdict(args),
            "rng": _rng_state(),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _to_t(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def train(args: Args, env_fn: Callable[[int], gym.Env] | None = None) -> dict:
    """Run PPO; returns the final metrics plus ``csv``, ``checkpoint`` and ``run_dir`` paths.

    ``env_fn(i)`` builds env i (default: ``ClusterEnv(preset=args.preset)``); envs must follow
    ClusterEnv's observation layout (context / cpu / mem / mask dict).
    """
    args = dataclasses.replace(args)
    args.batch_size = int(args.num_envs * args.num_steps)
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    run_dir = Path(args.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path = run_dir / "metrics.csv"
    ckpt_path = run_dir / "checkpoint.pt"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    agent = Agent()
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    start_iteration, global_step = 1, 0
    if args.init_from and not args.resume:
        init = load_checkpoint(args.init_from)["agent"]
        agent.actor.load_state_dict(
            {k[len("actor.") :]: v for k, v in init.items() if k.startswith("actor.")}
        )
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iteration = int(ckpt["iteration"]) + 1
        global_step = int(ckpt["global_step"])
        _set_rng_state(ckpt["rng"])

    # env setup: distinct seeds per env; a resumed run re-seeds so it does not replay workloads.
    # (The envs' own mid-episode state is not checkpointed: a resumed run starts new episodes.)
    thunks = [make_env(args, i, env_fn) for i in range(args.num_envs)]
    vec_cls = gym.vector.AsyncVectorEnv if args.async_envs else gym.vector.SyncVectorEnv
    if args.ray_address:
        from training.ray_envs import RayVectorEnv

        envs = RayVectorEnv(
            thunks, address=args.ray_address, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
        )
    else:
        envs = vec_cls(thunks, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "discrete actions only"
    sp = envs.single_observation_space
    E, T = args.num_envs, args.num_steps
    n_actions = int(envs.single_action_space.n)

    # storage
    ctx_b = torch.zeros((T, E) + sp["context"].shape)
    cpu_b = torch.zeros((T, E) + sp["cpu"].shape)
    mem_b = torch.zeros((T, E) + sp["mem"].shape)
    mask_b = torch.zeros((T, E, n_actions), dtype=torch.bool)
    actions = torch.zeros((T, E), dtype=torch.long)
    logprobs = torch.zeros((T, E))
    rewards = torch.zeros((T, E))
    dones = torch.zeros((T, E))
    values = torch.zeros((T, E))

    start_time = time.time()
    seed0 = args.seed + 100_003 * (start_iteration - 1)
    next_obs, infos = envs.reset(seed=[seed0 + i for i in range(E)])
    next_inv = [int(infos["inv"][i]) for i in range(E)]
    next_done = torch.zeros(E)
    # inv -> absolute step (iteration-local index is step - rollout_base); per env
    inv_step: list[dict[int, int]] = [{} for _ in range(E)]

    csv_new = not csv_path.exists() or not args.resume
    csv_f = open(csv_path, "w" if csv_new else "a", newline="")
    writer: csv.DictWriter | None = None
    metrics: dict[str, float] = {}
    progress = None
    if args.progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]ppo"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[live]}"),
        )
        progress.start()
        task = progress.add_task(
            "train", total=args.num_iterations, completed=start_iteration - 1, live=""
        )
    iteration = start_iteration - 1
    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            # -- anneal LR
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            # -- rollout
            rewards.zero_()
            base = (iteration - 1) * T  # absolute step of buffer row 0
            ep_returns, ep_lengths, ep_rfets, fin_rfets = [], [], [], []
            credited = dropped = 0
            for step in range(T):
                global_step += E
                ctx_b[step] = _to_t(next_obs["context"])
                cpu_b[step] = _to_t(next_obs["cpu"])
                mem_b[step] = _to_t(next_obs["mem"])
                mask_b[step] = _to_t(next_obs["mask"], torch.bool)
                dones[step] = next_done
                for i in range(E):
                    inv_step[i][next_inv[i]] = base + step
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(
                        ctx_b[step], cpu_b[step], mem_b[step], mask_b[step]
                    )
                    values[step] = value.flatten()
                actions[step] = action
                logprobs[step] = logprob

                next_obs, _, term, trunc, infos = envs.step(action.numpy())
                done = np.logical_or(term, trunc)
                next_done = torch.as_tensor(done, dtype=torch.float32)
                credit, episode = _split_infos(infos, E)
                for i in range(E):
                    if credit[i] is not None:
                        _, ids, rews, rfet = credit[i]
                        fin_rfets.extend(np.asarray(rfet)[np.isfinite(rfet)].tolist())
                        for inv, r in zip(ids.tolist(), rews.tolist()):
                            s = inv_step[i].pop(inv, None)
                            if s is not None and s >= base and math.isfinite(r):
                                rewards[s - base, i] += r
                                credited += 1
                            else:
                                dropped += 1
                    if episode[i] is not None:
                        ep_returns.append(float(episode[i]["r"]))
                        ep_lengths.append(int(episode[i]["l"]))
                        ep_rfets.append(float(episode[i]["rfet"]))
                        inv_step[i].clear()  # a new episode numbers invocations from 0
                    next_inv[i] = int(infos["inv"][i])
                # forget decisions whose rollout is gone (their rewards can no longer be credited)
            for i in range(E):
                stale = [k for k, s in inv_step[i].items() if s < base]
                for k in stale:
                    del inv_step[i][k]

            # -- GAE, backwards
            with torch.no_grad():
                next_value = agent.get_value(_to_t(next_obs["context"])).reshape(1, -1)
                advantages = torch.zeros_like(rewards)
                lastgaelam = 0
                for t in reversed(range(T)):
                    if t == T - 1:
                        nextnonterminal = 1.0 - next_done
                        nextvalues = next_value
                    else:
                        nextnonterminal = 1.0 - dones[t + 1]
                        nextvalues = values[t + 1]
                    delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                    advantages[t] = lastgaelam = (
                        delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
                    )
                returns = advantages + values

            # -- flatten the batch
            b_ctx = ctx_b.reshape((-1,) + sp["context"].shape)
            b_cpu = cpu_b.reshape((-1,) + sp["cpu"].shape)
            b_mem = mem_b.reshape((-1,) + sp["mem"].shape)
            b_mask = mask_b.reshape(-1, n_actions)
            b_logprobs = logprobs.reshape(-1)
            b_actions = actions.reshape(-1)
            b_advantages = advantages.reshape(-1)
            b_returns = returns.reshape(-1)
            b_values = values.reshape(-1)

            # -- optimise policy and value networks
            b_inds = np.arange(args.batch_size)
            clipfracs = []
            for _epoch in range(args.update_epochs):
                np.random.shuffle(b_inds)
                for start in range(0, args.batch_size, args.minibatch_size):
                    mb_inds = b_inds[start : start + args.minibatch_size]
                    _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                        b_ctx[mb_inds],
                        b_cpu[mb_inds],
                        b_mem[mb_inds],
                        b_mask[mb_inds],
                        b_actions[mb_inds],
                    )
                    logratio = newlogprob - b_logprobs[mb_inds]
                    ratio = logratio.exp()
                    with torch.no_grad():
                        old_approx_kl = (-logratio).mean()
                        approx_kl = ((ratio - 1) - logratio).mean()
                        clipfracs += [((ratio - 1.0).abs() > args.clip_coef).float().mean().item()]

                    mb_advantages = b_advantages[mb_inds]
                    if args.norm_adv:
                        mb_advantages = (mb_advantages - mb_advantages.mean()) / (
                            mb_advantages.std() + 1e-8
                        )

                    # policy loss
                    pg_loss1 = -mb_advantages * ratio
                    pg_loss2 = -mb_advantages * torch.clamp(
                        ratio, 1 - args.clip_coef, 1 + args.clip_coef
                    )
                    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                    # value loss
                    newvalue = newvalue.view(-1)
                    if args.clip_vloss:
                        v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                        v_clipped = b_values[mb_inds] + torch.clamp(
                            newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef
                        )
                        v_loss_clipped = (v_clipped - b_returns[mb_inds]) ** 2
                        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
                    else:
                        v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()

                    entropy_loss = entropy.mean()
                    loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                    optimizer.step()

                if args.target_kl is not None and approx_kl > args.target_kl:
                    break

            y_pred, y_true = b_values.numpy(), b_returns.numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

            # -- log
            nan = float("nan")
            metrics = {
                "iteration": iteration,
                "global_step": global_step,
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                "charts/episodic_return": float(np.mean(ep_returns)) if ep_returns else nan,
                "charts/episodic_length": float(np.mean(ep_lengths)) if ep_lengths else nan,
                "charts/episodes": len(ep_returns),
                "charts/mean_step_reward": float(rewards.mean()),
                "charts/dropped_reward_frac": dropped / max(1, dropped + credited),
                "charts/SPS": int((global_step) / max(1e-9, time.time() - start_time)),
                "losses/value_loss": v_loss.item(),
                "losses/policy_loss": pg_loss.item(),
                "losses/entropy": entropy_loss.item(),
                "losses/old_approx_kl": old_approx_kl.item(),
                "losses/approx_kl": approx_kl.item(),
                "losses/clipfrac": float(np.mean(clipfracs)),
                "losses/explained_variance": float(explained_var),
                "sim/mean_rfet": float(np.mean(fin_rfets)) if fin_rfets else nan,
                "sim/episode_mean_rfet": float(np.nanmean(ep_rfets))
                if ep_rfets and not all(map(math.isnan, ep_rfets))
                else nan,
                "sim/finished": len(fin_rfets),
            }
            if writer is None:
                writer = csv.DictWriter(csv_f, fieldnames=list(metrics))
                if csv_new:
                    writer.writeheader()
            writer.writerow(metrics)
            csv_f.flush()
            if progress is not None:
                progress.update(
                    task,
                    completed=iteration,
                    live=f"step {global_step} R {metrics['charts/mean_step_reward']:.3f} "
                    f"rfet {metrics['sim/mean_rfet']:.3f} ent {metrics['losses/entropy']:.2f}",
                )
            if args.checkpoint_every and iteration % args.checkpoint_every == 0:
                save_checkpoint(ckpt_path, agent, optimizer, iteration, global_step, args)
    finally:
        if progress is not None:
            progress.stop()
        csv_f.close()
        envs.close()

    save_checkpoint(ckpt_path, agent, optimizer, iteration, global_step, args)
    return {
        **metrics,
        "iteration": iteration,
        "global_step": global_step,
        "csv": str(csv_path),
        "checkpoint": str(ckpt_path),
        "run_dir": str(run_dir),
        "agent": agent,
    }


def agent_from_checkpoint(path: str | Path) -> tuple[Agent, dict]:
    """The agent of a checkpoint and the checkpoint's ``args`` dict."""
    ckpt = load_checkpoint(path)
    agent = Agent()
    agent.load_state_dict(ckpt["agent"])
    agent.eval()
    return agent, ckpt["args"]


def parse_args(argv: list[str] | None = None) -> Args:
    """Every ``Args`` field as a ``--flag``; the docstring under each field is its help."""
    import tyro

    return tyro.cli(Args, args=argv, prog="faasrm train", description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = train(args)
    out.pop("agent")
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
