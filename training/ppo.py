"""PPO for the score-function policy (CleanRL-style, one readable file).

The actor is ONE small network applied to every candidate row (context + candidate columns, laid
out exactly as ``sidecar.core.features.expand_rows``); its masked scores are the logits of one
categorical action, so the exported actor is the scorer the sidecar runs. The critic is a separate
MLP over the context vector only.

Credit assignment: the reward of an invocation belongs to the decision that allocated it, not to
the step at which its outcome became known. ``CreditLedger`` keeps, per env, a map ``inv ->
rollout step`` and adds each rewarded invocation's reward to that step. The simulator reports an
invocation's reward when it finishes (it includes the queueing it caused others while it ran);
an episode of ``episode_decisions`` drains at its end, so a rollout of whole episodes loses none.
With whole traces as episodes, invocations still running or queued when a rollout ends lose their
reward (a known approximation; ``charts/dropped_reward_frac`` logs the share). ``ppo_loss`` is
the loss of one minibatch, shared with the trainer service's online updates
(``training.online``).

Usage: ``python -m training.ppo --preset small --total-timesteps 200000`` (every ``Args`` field is
a ``--flag``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from torch.distributions.categorical import Categorical

from sidecar.core.features import N_CONTEXT, N_FEATURES

if TYPE_CHECKING:
    from training.sim.presets import Preset

MASKED_LOGIT = -1e9
"""Logit given to masked-out candidates: exp() underflows to exactly 0 in float32, no NaN."""


@dataclass
class Args:
    exp_name: str = "ppo"
    """the name of this experiment (used in the output directory name)"""
    preset: str = "small"
    """the simulation preset (training.sim.presets) the envs draw workloads from"""
    mem_margin_units: float | None = None
    """the safeguard's memory margin the envs decide under (SafeguardConfig.mem_margin_units;
    None: the preset's, a quarter unit, as on a node)"""
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


def train_preset(args: Args) -> Preset:
    """The preset the envs draw from, its safeguard's memory margin as ``args`` names it."""
    from training.sim.presets import get_preset

    preset = get_preset(args.preset)
    if args.mem_margin_units is None:
        return preset
    return preset.with_safeguard(mem_margin_units=args.mem_margin_units)


def make_env(
    args: Args, idx: int, env_fn: Callable[[int], gym.Env] | None
) -> Callable[[], gym.Env]:
    def thunk() -> gym.Env:
        if env_fn is not None:
            env = env_fn(idx)
        else:
            from training.sim.env import ClusterEnv  # each reset draws a new workload

            env = ClusterEnv(preset=train_preset(args), max_decisions=args.episode_decisions)
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


class CreditLedger:
    """Credits each invocation's reward to the rollout step that decided it, per env.

    ``decided`` maps this step's invocations to the step; ``credit`` adds the rewards that became
    known to their deciding step's row of ``rewards``. A reward whose decision is not in the
    current rollout (an earlier one's, or unknown) or is not finite is dropped and counted. A new
    episode numbers invocations from 0 again, so it clears its env's map; ``forget_stale`` drops
    the decisions older than the rollout (their rewards can no longer be credited).
    """

    def __init__(self, num_envs: int) -> None:
        self.step_of: list[dict[int, int]] = [{} for _ in range(num_envs)]  # inv -> absolute step
        self.base = 0  # absolute step of the rollout's row 0
        self.credited = self.dropped = 0

    def start_rollout(self, base: int) -> None:
        self.base = base
        self.credited = self.dropped = 0

    def decided(self, invs: list[int], step: int) -> None:
        for i, inv in enumerate(invs):
            self.step_of[i][inv] = self.base + step

    def credit(
        self, rewards: torch.Tensor, credit: list[tuple | None], episode: list[dict | None]
    ) -> None:
        for i, (c, ep) in enumerate(zip(credit, episode)):
            if c is not None:
                _, ids, rews, _ = c
                step_of = self.step_of[i]
                for inv, r in zip(ids.tolist(), rews.tolist()):
                    s = step_of.pop(inv, None)
                    if s is not None and s >= self.base and math.isfinite(r):
                        rewards[s - self.base, i] += r
                        self.credited += 1
                    else:
                        self.dropped += 1
            if ep is not None:
                self.step_of[i].clear()

    def forget_stale(self) -> None:
        for step_of in self.step_of:
            for k in [k for k, s in step_of.items() if s < self.base]:
                del step_of[k]

    @property
    def dropped_frac(self) -> float:
        return self.dropped / max(1, self.dropped + self.credited)


class RolloutStats:
    """The episodes and finished invocations of one rollout, for the ``charts/`` and ``sim/``
    columns of the log."""

    def __init__(self) -> None:
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self.episode_rfets: list[float] = []
        self.rfets: list[float] = []

    def add(self, credit: list[tuple | None], episode: list[dict | None]) -> None:
        for c, ep in zip(credit, episode):
            if c is not None:
                rfet = c[3]
                self.rfets.extend(np.asarray(rfet)[np.isfinite(rfet)].tolist())
            if ep is not None:
                self.returns.append(float(ep["r"]))
                self.lengths.append(int(ep["l"]))
                self.episode_rfets.append(float(ep["rfet"]))

    def charts(self) -> dict[str, float]:
        nan = float("nan")
        return {
            "charts/episodic_return": float(np.mean(self.returns)) if self.returns else nan,
            "charts/episodic_length": float(np.mean(self.lengths)) if self.lengths else nan,
            "charts/episodes": len(self.returns),
        }

    def sim(self) -> dict[str, float]:
        nan = float("nan")
        ep = self.episode_rfets
        return {
            "sim/mean_rfet": float(np.mean(self.rfets)) if self.rfets else nan,
            "sim/episode_mean_rfet": float(np.nanmean(ep))
            if ep and not all(map(math.isnan, ep))
            else nan,
            "sim/finished": len(self.rfets),
        }


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


_NUMPY_RNG_GLOBALS = [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype, np.dtypes.UInt32DType]
"""What a checkpoint holds beyond tensors and plain data: numpy's RNG state (``rng``)."""


def load_checkpoint(source: str | Path | bytes) -> dict:
    """A checkpoint (a file, or its bytes), loaded without running code it may carry
    (``weights_only``): the trainer loads checkpoints that came over the network."""
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
        return torch.load(f, map_location="cpu", weights_only=True)


def _to_t(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


class PPOLoss(NamedTuple):
    loss: torch.Tensor
    pg_loss: torch.Tensor
    v_loss: torch.Tensor
    entropy_loss: torch.Tensor
    old_approx_kl: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: float


def ppo_loss(
    newlogprob: torch.Tensor,
    entropy: torch.Tensor,
    newvalue: torch.Tensor,
    mb_logprobs: torch.Tensor,
    mb_advantages: torch.Tensor,
    mb_returns: torch.Tensor,
    mb_values: torch.Tensor,
    *,
    clip_coef: float,
    clip_vloss: bool,
    norm_adv: bool,
    ent_coef: float,
    vf_coef: float,
) -> PPOLoss:
    """CleanRL's PPO loss of one minibatch: clipped surrogate, (optionally clipped) value loss and
    entropy bonus, with the approx-KL and clip-fraction statistics. ``new*`` come from the
    current agent, ``mb_*`` from the rollout (old log-probabilities, advantages, returns,
    values). A minibatch of one decision (the last of a batch that does not divide evenly) keeps
    its advantage as it is."""
    logratio = newlogprob - mb_logprobs
    ratio = logratio.exp()
    with torch.no_grad():
        # calculate approx_kl http://joschu.net/blog/kl-approx.html
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_coef).float().mean().item()

    if norm_adv and mb_advantages.numel() > 1:  # one value has no spread: its std() is NaN
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

    # policy loss
    pg_loss1 = -mb_advantages * ratio
    pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    # value loss
    newvalue = newvalue.view(-1)
    if clip_vloss:
        v_loss_unclipped = (newvalue - mb_returns) ** 2
        v_clipped = mb_values + torch.clamp(newvalue - mb_values, -clip_coef, clip_coef)
        v_loss_clipped = (v_clipped - mb_returns) ** 2
        v_loss = 0.5 * torch.max(v_loss_unclipped, v_loss_clipped).mean()
    else:
        v_loss = 0.5 * ((newvalue - mb_returns) ** 2).mean()

    entropy_loss = entropy.mean()
    loss = pg_loss - ent_coef * entropy_loss + v_loss * vf_coef
    return PPOLoss(loss, pg_loss, v_loss, entropy_loss, old_approx_kl, approx_kl, clipfrac)


class RunLog:
    """The run's CSV log (one row per iteration, appended to on resume) and progress bar."""

    def __init__(self, path: Path, args: Args, start_iteration: int) -> None:
        self.new = not path.exists() or not args.resume
        self.file = open(path, "w" if self.new else "a", newline="")
        self.writer: csv.DictWriter | None = None
        self.progress = None
        if args.progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]ppo"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[live]}"),
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train", total=args.num_iterations, completed=start_iteration - 1, live=""
            )

    def write(self, metrics: dict[str, float]) -> None:
        if self.writer is None:
            self.writer = csv.DictWriter(self.file, fieldnames=list(metrics))
            if self.new:
                self.writer.writeheader()
        self.writer.writerow(metrics)
        self.file.flush()
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=metrics["iteration"],
                live=f"step {metrics['global_step']} R {metrics['charts/mean_step_reward']:.3f} "
                f"rfet {metrics['sim/mean_rfet']:.3f} ent {metrics['losses/entropy']:.2f}",
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.file.close()


def make_envs(args: Args, env_fn: Callable[[int], gym.Env] | None) -> gym.vector.VectorEnv:
    """``num_envs`` envs, stepped in this process, in subprocesses or in Ray actors."""
    thunks = [make_env(args, i, env_fn) for i in range(args.num_envs)]
    autoreset = gym.vector.AutoresetMode.SAME_STEP
    if args.ray_address:
        from training.ray_envs import RayVectorEnv

        return RayVectorEnv(thunks, address=args.ray_address, autoreset_mode=autoreset)
    vec_cls = gym.vector.AsyncVectorEnv if args.async_envs else gym.vector.SyncVectorEnv
    return vec_cls(thunks, autoreset_mode=autoreset)


def _agent(args: Args) -> tuple[Agent, torch.optim.Optimizer, int, int]:
    """(agent, optimizer, first iteration, global step): fresh, from ``init_from``'s actor, or
    resumed from a checkpoint (with its RNG state)."""
    agent = Agent()
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    if args.init_from and not args.resume:
        init = load_checkpoint(args.init_from)["agent"]
        agent.actor.load_state_dict(
            {k[len("actor.") :]: v for k, v in init.items() if k.startswith("actor.")}
        )
    if not args.resume:
        return agent, optimizer, 1, 0
    ckpt = load_checkpoint(args.resume)
    agent.load_state_dict(ckpt["agent"])
    optimizer.load_state_dict(ckpt["optimizer"])
    _set_rng_state(ckpt["rng"])
    return agent, optimizer, int(ckpt["iteration"]) + 1, int(ckpt["global_step"])


def train(args: Args, env_fn: Callable[[int], gym.Env] | None = None) -> dict:
    """Run PPO; returns the final metrics plus ``csv``, ``checkpoint`` and ``run_dir`` paths.

    ``env_fn(i)`` builds env i (default: ``ClusterEnv(preset=args.preset)``); envs must follow
    ClusterEnv's observation layout (context / cpu / mem / mask dict).
    """
    args = dataclasses.replace(args)
    args.batch_size = int(args.num_envs * args.num_steps)
    if not 1 <= args.num_minibatches <= args.batch_size:
        raise ValueError(
            f"num_minibatches {args.num_minibatches} must be 1..{args.batch_size} "
            "(num_envs x num_steps): a minibatch needs at least one decision"
        )
    args.minibatch_size = int(args.batch_size // args.num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    run_dir = Path(args.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path = run_dir / "metrics.csv"
    ckpt_path = run_dir / "checkpoint.pt"

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    agent, optimizer, start_iteration, global_step = _agent(args)

    # env setup: distinct seeds per env; a resumed run re-seeds so it does not replay workloads.
    # (The envs' own mid-episode state is not checkpointed: a resumed run starts new episodes.)
    envs = make_envs(args, env_fn)
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "discrete actions only"
    sp = envs.single_observation_space
    E, T = args.num_envs, args.num_steps
    n_actions = int(envs.single_action_space.n)

    # ALGO Logic: Storage setup
    ctx_b = torch.zeros((T, E) + sp["context"].shape)
    cpu_b = torch.zeros((T, E) + sp["cpu"].shape)
    mem_b = torch.zeros((T, E) + sp["mem"].shape)
    mask_b = torch.zeros((T, E, n_actions), dtype=torch.bool)
    actions = torch.zeros((T, E), dtype=torch.long)
    logprobs = torch.zeros((T, E))
    rewards = torch.zeros((T, E))
    dones = torch.zeros((T, E))
    values = torch.zeros((T, E))

    # TRY NOT TO MODIFY: start the game
    start_time = time.time()
    seed0 = args.seed + 100_003 * (start_iteration - 1)
    next_obs, infos = envs.reset(seed=[seed0 + i for i in range(E)])
    next_inv = [int(infos["inv"][i]) for i in range(E)]
    next_done = torch.zeros(E)
    ledger = CreditLedger(E)
    log = RunLog(csv_path, args, start_iteration)
    metrics: dict[str, float] = {}
    iteration = start_iteration - 1
    try:
        for iteration in range(start_iteration, args.num_iterations + 1):
            # Annealing the rate if instructed to do so.
            if args.anneal_lr:
                frac = 1.0 - (iteration - 1.0) / args.num_iterations
                optimizer.param_groups[0]["lr"] = frac * args.learning_rate

            # rollout: each reward goes to the step that decided its invocation
            rewards.zero_()
            ledger.start_rollout((iteration - 1) * T)
            stats = RolloutStats()
            for step in range(T):
                global_step += E
                ctx_b[step] = _to_t(next_obs["context"])
                cpu_b[step] = _to_t(next_obs["cpu"])
                mem_b[step] = _to_t(next_obs["mem"])
                mask_b[step] = _to_t(next_obs["mask"], torch.bool)
                dones[step] = next_done
                ledger.decided(next_inv, step)

                # ALGO LOGIC: action logic
                with torch.no_grad():
                    action, logprob, _, value = agent.get_action_and_value(
                        ctx_b[step], cpu_b[step], mem_b[step], mask_b[step]
                    )
                    values[step] = value.flatten()
                actions[step] = action
                logprobs[step] = logprob

                # TRY NOT TO MODIFY: execute the game and log data.
                next_obs, _, term, trunc, infos = envs.step(action.numpy())
                next_done = torch.as_tensor(np.logical_or(term, trunc), dtype=torch.float32)
                credit, episode = _split_infos(infos, E)
                ledger.credit(rewards, credit, episode)
                stats.add(credit, episode)
                next_inv = [int(infos["inv"][i]) for i in range(E)]
            ledger.forget_stale()

            # bootstrap value if not done
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

            # flatten the batch
            b_ctx = ctx_b.reshape((-1,) + sp["context"].shape)
            b_cpu = cpu_b.reshape((-1,) + sp["cpu"].shape)
            b_mem = mem_b.reshape((-1,) + sp["mem"].shape)
            b_mask = mask_b.reshape(-1, n_actions)
            b_logprobs = logprobs.reshape(-1)
            b_actions = actions.reshape(-1)
            b_advantages = advantages.reshape(-1)
            b_returns = returns.reshape(-1)
            b_values = values.reshape(-1)

            # Optimizing the policy and value network
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
                    out = ppo_loss(
                        newlogprob,
                        entropy,
                        newvalue,
                        b_logprobs[mb_inds],
                        b_advantages[mb_inds],
                        b_returns[mb_inds],
                        b_values[mb_inds],
                        clip_coef=args.clip_coef,
                        clip_vloss=args.clip_vloss,
                        norm_adv=args.norm_adv,
                        ent_coef=args.ent_coef,
                        vf_coef=args.vf_coef,
                    )
                    clipfracs.append(out.clipfrac)

                    optimizer.zero_grad()
                    out.loss.backward()
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                    optimizer.step()

                if args.target_kl is not None and out.approx_kl > args.target_kl:
                    break

            y_pred, y_true = b_values.numpy(), b_returns.numpy()
            var_y = np.var(y_true)
            explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

            # TRY NOT TO MODIFY: record rewards for plotting purposes
            metrics = {
                "iteration": iteration,
                "global_step": global_step,
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                **stats.charts(),
                "charts/mean_step_reward": float(rewards.mean()),
                "charts/dropped_reward_frac": ledger.dropped_frac,
                "charts/SPS": int((global_step) / max(1e-9, time.time() - start_time)),
                "losses/value_loss": out.v_loss.item(),
                "losses/policy_loss": out.pg_loss.item(),
                "losses/entropy": out.entropy_loss.item(),
                "losses/old_approx_kl": out.old_approx_kl.item(),
                "losses/approx_kl": out.approx_kl.item(),
                "losses/clipfrac": float(np.mean(clipfracs)),
                "losses/explained_variance": float(explained_var),
                **stats.sim(),
            }
            log.write(metrics)
            if args.checkpoint_every and iteration % args.checkpoint_every == 0:
                save_checkpoint(ckpt_path, agent, optimizer, iteration, global_step, args)
    finally:
        log.close()
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
    """The agent of a checkpoint and the checkpoint's ``args`` dict. ValueError for one without
    ``args``: its preset, and so the grid an export is for, would have to be guessed."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("args"), dict):
        raise ValueError(
            f"{path}: the checkpoint records no training args (its preset and grid); a "
            "behaviour-cloning checkpoint from before it recorded them must be made again"
        )
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
