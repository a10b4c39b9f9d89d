"""Behaviour cloning from the Oracle: a warm start for PPO.

A randomly initialised score network explores by over-allocating; on a busy cluster that
fills the admission queue, every invocation then waits, and the reward signal drowns in
queueing delay that no single decision caused. So PPO starts from a policy that already
imitates a privileged teacher: the Oracle (which knows each invocation's true demand),
projected onto the safeguard's allowed ranges. The student sees only what a host sees (the
feature rows), so it learns to *predict* demand from recent peaks; PPO then fine-tunes it on
the real reward. The critic is left to PPO.

Usage: ``python -m training.pretrain --preset small --episodes 8 --out runs/bc.pt``, then
``faasrm train --init-from runs/bc.pt``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.baselines import BoxedOracle
from training.ppo import MASKED_LOGIT, Agent, build_rows
from training.sim.env import ClusterEnv


def teacher_action(env: ClusterEnv) -> int:
    """The in-box Oracle's choice (``BoxedOracle``) for the env's pending request."""
    sim, req = env.sim, env._req
    assert sim is not None and req is not None
    return env.grid.index(BoxedOracle().decide(sim, req))


def collect(preset: str, episodes: int, decisions: int, seed: int) -> dict[str, np.ndarray]:
    """Observations and teacher actions from teacher-driven episodes (fresh workload each)."""
    env = ClusterEnv(preset=preset, max_decisions=decisions)
    out: dict[str, list] = {"context": [], "cpu": [], "mem": [], "mask": [], "action": []}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            a = teacher_action(env)
            for k in ("context", "cpu", "mem", "mask"):
                out[k].append(obs[k])
            out["action"].append(a)
            obs, _, done, _, _ = env.step(a)
    return {k: np.stack(v) for k, v in out.items()}


def fit(data: dict[str, np.ndarray], epochs: int, lr: float, seed: int) -> tuple[Agent, float]:
    """Cross-entropy of the masked score softmax against the teacher; returns agent, accuracy."""
    torch.manual_seed(seed)
    agent = Agent()
    opt = torch.optim.Adam(agent.actor.parameters(), lr=lr)
    t = {k: torch.as_tensor(v) for k, v in data.items()}
    # Calibration runs allow one candidate: nothing to learn there.
    useful = torch.nonzero(t["mask"].sum(dim=1) > 1).squeeze(1)
    for _ in range(epochs):
        perm = useful[torch.randperm(len(useful))]
        for mb in perm.split(512):
            logits = _logits(agent, t, mb)
            loss = F.cross_entropy(logits, t["action"][mb])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (_logits(agent, t, useful).argmax(1) == t["action"][useful]).float().mean()
    return agent, float(acc)


def _logits(agent: Agent, t: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    rows = build_rows(t["context"][idx].float(), t["cpu"][idx].float(), t["mem"][idx].float())
    scores = agent.scores(rows)
    return torch.where(t["mask"][idx].bool(), scores, torch.full_like(scores, MASKED_LOGIT))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="behaviour cloning of the Oracle (PPO warm start)")
    p.add_argument("--preset", default="small")
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--decisions", type=int, default=1024, help="decisions per episode")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--out", required=True, help="checkpoint path for faasrm train --init-from")
    a = p.parse_args(argv)
    data = collect(a.preset, a.episodes, a.decisions, a.seed)
    agent, acc = fit(data, a.epochs, a.lr, a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "agent": agent.state_dict(),
            "args": {"preset": a.preset, "behaviour_cloning": vars(a)},  # export reads the preset
            "bc_accuracy": acc,
            "samples": len(data["action"]),
        },
        a.out,
    )
    print(
        f"behaviour cloning: {len(data['action'])} samples, teacher agreement {acc:.1%} -> {a.out}"
    )


if __name__ == "__main__":
    main()
