"""Online learning in the trainer service: real trajectories -> PPO update -> gate -> promotion.

One update (``Learner.step``, on a worker thread):

1. batch: the newest ``window_records`` accepted records on the trainer's grid and feature
   encoding (``sidecar.core.record.readable``) with a reward
   (records with ``reward`` None: safeguard first runs, lost invocations, are skipped);
2. start from the latest promoted version's agent checkpoint (else ``init_checkpoint``, else a
   fresh ``Agent`` when the registry is empty);
3. PPO epochs with ``training.ppo.Agent`` and offline PPO's loss (``training.ppo.ppo_loss``:
   clipped surrogate, clipped value loss, entropy bonus) and grad-norm clip. Each real decision
   is a one-step episode: its reward is the outcome of the invocation it sized, so the return is
   the reward and the advantage ``reward - V(context)``; the old log-probability is the one the
   node recorded (importance ratio against the policy the node actually ran). An update that
   meets a non-finite parameter or loss (``Diverged``) is "rejected" here: nothing is exported;
4. export the candidate with ``training.export.export`` on the nodes' grid;
5. the promotion gate, both must pass (a ratchet: only a better model replaces the running one):
   * simulator (``sim_gate``): ``training.evaluate.evaluate`` on ``gate.preset`` with the fixed
     ``gate.seed`` (held out: never used for training), the candidate against the running model
     (none: nothing extra) and both model-free rules (``rule``, ``smallest``) on the same
     invocations; the candidate's mean RFET must beat each of them by more than ``min_gain`` at
     the upper bound of the 95% paired bootstrap interval, with no more OOM failures than the
     fewest of theirs (plus ``max_failure_increase``) and no larger share of RFET > 1.2 than the
     running model's;
   * recent real data: replay the newest ``gate.real_window`` real decisions through the
     candidate and the current model (greedy, under each record's safeguard mask) and compare the
     predicted slowdown rate (allocated cores below the measured CPU peak / ``slowdown_rfet``) and
     failure rate (allocated memory below the measured peak); the candidate may exceed the current
     rate by ``real_max_increase`` plus two standard errors of it. The current model's observed real
     slowdown and failure rates are reported beside them.
6. promote: a new registry version (ONNX, export metadata, the gate report as evaluation, the
   agent checkpoint), then every long-poll is woken. The registry runs the nodes' model checks
   first; a candidate they would refuse (NaN scores after a diverged update) is "rejected", and
   so is one whose gate compared it with a version no longer the latest (another was published
   during the update: ``training.registry.Superseded``).

Every decision, promoted or refused, keeps its gate report and reason in ``Learner.history``
(``/debug/learner``); a gate that raises is recorded as an "error" with its reason, and no
candidate file outlives its update.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from sidecar.core.features import expand_rows
from sidecar.core.grid import ResourceGrid
from sidecar.core.policy import OnnxScorer, fallback_scorer
from sidecar.core.record import learnable, readable
from sidecar.models import ModelRejected
from training.baselines import RULE_MANAGERS
from training.evidence import SimRun, sim_report
from training.ppo import Agent, PPOLoss, load_checkpoint, ppo_loss
from training.registry import Superseded

log = logging.getLogger("faasrm.learner")


# ------------------------------------------------------------------------------------ data
def records_to_batch(records: list[dict], grid: ResourceGrid) -> dict[str, torch.Tensor] | None:
    """Learnable records (``sidecar.core.record.learnable``) -> ``b_*`` tensors; None if none."""
    b = learnable(records, grid)
    if b is None:
        return None
    return {
        "ctx": torch.as_tensor(b.context),
        "cpu": torch.as_tensor(b.cpu),
        "mem": torch.as_tensor(b.mem),
        "mask": torch.as_tensor(b.mask),
        "actions": torch.as_tensor(b.action, dtype=torch.long),
        "logprobs": torch.as_tensor(b.logp),
        "rewards": torch.as_tensor(b.reward),
    }


# ------------------------------------------------------------------------------------ PPO update
class Diverged(ArithmeticError):
    """A PPO update met non-finite parameters or a non-finite loss: its agent is garbage."""


def _check_finite(agent: Agent, when: str) -> None:
    bad = [name for name, p in agent.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise Diverged(f"non-finite parameters {', '.join(bad)} {when}")


def ppo_update(
    agent: Agent, b: dict[str, torch.Tensor], cfg: Any, seed: int = 0
) -> dict[str, float]:
    """PPO epochs over one batch of one-step episodes; returns the ``losses/`` scalars. Raises
    Diverged as soon as a parameter or the loss is not finite (before the policy's distribution
    would refuse NaN logits with a less telling error)."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)
    b_ctx, b_cpu, b_mem, b_mask = b["ctx"], b["cpu"], b["mem"], b["mask"]
    b_actions, b_logprobs = b["actions"], b["logprobs"]
    with torch.no_grad():
        b_values = agent.get_value(b_ctx).view(-1)
    b_returns = b["rewards"]  # one-step episodes: the return is the reward
    b_advantages = b_returns - b_values
    batch_size = len(b_actions)
    minibatch_size = max(1, batch_size // cfg.num_minibatches)
    b_inds = np.arange(batch_size)
    clipfracs: list[float] = []
    zero = torch.zeros(())
    out = PPOLoss(zero, zero, zero, zero, zero, zero, 0.0)  # no minibatch (update_epochs 0)
    for epoch in range(cfg.update_epochs):
        rng.shuffle(b_inds)
        for start in range(0, batch_size, minibatch_size):
            mb_inds = b_inds[start : start + minibatch_size]
            _check_finite(agent, f"in epoch {epoch}")
            _, newlogprob, entropy, newvalue = agent.get_action_and_value(
                b_ctx[mb_inds], b_cpu[mb_inds], b_mem[mb_inds], b_mask[mb_inds], b_actions[mb_inds]
            )
            out = ppo_loss(
                newlogprob,
                entropy,
                newvalue,
                b_logprobs[mb_inds],
                b_advantages[mb_inds],
                b_returns[mb_inds],
                b_values[mb_inds],
                clip_coef=cfg.clip_coef,
                clip_vloss=True,
                norm_adv=True,
                ent_coef=cfg.ent_coef,
                vf_coef=cfg.vf_coef,
            )
            if not torch.isfinite(out.loss):
                raise Diverged(f"non-finite loss in epoch {epoch}")
            clipfracs.append(out.clipfrac)

            optimizer.zero_grad()
            out.loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()
    _check_finite(agent, "after the update")
    return {
        "losses/policy_loss": float(out.pg_loss.item()),
        "losses/value_loss": float(out.v_loss.item()),
        "losses/entropy": float(out.entropy_loss.item()),
        "losses/old_approx_kl": float(out.old_approx_kl.item()),
        "losses/approx_kl": float(out.approx_kl.item()),
        "losses/clipfrac": float(np.mean(clipfracs)) if clipfracs else 0.0,
        "charts/mean_reward": float(b["rewards"].mean()),
        "charts/batch_size": batch_size,
    }


# ------------------------------------------------------------------------------------ gate
def greedy_allocs(scorer: Any, records: list[dict], grid: ResourceGrid) -> np.ndarray:
    """(R, 2) cores and MB each record's decision would get from ``scorer`` (masked argmax)."""
    ctx = np.asarray([r["context"] for r in records], np.float32)
    cpu = np.asarray([r["cpu_block"] for r in records], np.float32)
    mem = np.asarray([r["mem_block"] for r in records], np.float32)
    rows = expand_rows(ctx, cpu, mem)  # (R, n, F)
    scores = np.asarray(scorer.scores(rows.reshape(-1, rows.shape[-1])), np.float64)
    scores = scores.reshape(len(records), grid.n)
    masks = np.unpackbits(
        np.frombuffer(b"".join(r["mask"] for r in records), np.uint8).reshape(len(records), -1),
        axis=1,
    )[:, : grid.n].astype(bool)
    scores = np.where(masks, np.nan_to_num(scores, nan=-np.inf), -np.inf)
    a = scores.argmax(axis=1)
    cpu_units = a // grid.mem_units + 1
    mem_units = a % grid.mem_units + 1
    return np.stack([cpu_units * grid.cpu_unit_cores, mem_units * grid.mem_unit_mb], axis=1)


def real_rates(scorer: Any, records: list[dict], grid: ResourceGrid, slowdown_rfet: float) -> dict:
    alloc = greedy_allocs(scorer, records, grid)
    peak_cpu = np.asarray([float(r.get("cpu_peak_cores") or 0.0) for r in records])
    peak_mb = np.asarray([float(r.get("mem_peak_mb") or 0.0) for r in records])
    slow = alloc[:, 0] < np.nan_to_num(peak_cpu) / slowdown_rfet
    fail = alloc[:, 1] < np.nan_to_num(peak_mb)
    return {"pred_slowdown_rate": float(slow.mean()), "pred_failure_rate": float(fail.mean())}


def observed_rates(records: list[dict], model: str | None, slowdown_rfet: float) -> dict:
    mine = [r for r in records if model is None or r.get("model") == model]
    mine = [r for r in mine if r.get("outcome") != "lost"]
    if not mine:
        return {"invocations": 0, "slowdown_rate": None, "failure_rate": None}
    fail = [r["outcome"] in ("failure", "oom") for r in mine]
    slow = [
        bool(r.get("baseline_s")) and r["duration_s"] > slowdown_rfet * r["baseline_s"]
        for r in mine
    ]
    return {
        "invocations": len(mine),
        "slowdown_rate": float(np.mean(slow)),
        "failure_rate": float(np.mean(fail)),
    }


NAMES = {"running": "the running model", "rule": "rule", "smallest": "smallest"}
"""What the gate compares the candidate with, as its reasons name them."""
SimKey = tuple[str, int, str]
"""A cached simulator run: (preset, seed, rule name or the model's sha256)."""


def _sim_runs(
    grid: ResourceGrid, cfg: Any, managers: list[str], model: Path | None = None
) -> dict[str, SimRun]:
    from training.evaluate import evaluate
    from training.sim.presets import get_preset

    p = get_preset(cfg.preset, grid=grid)
    return evaluate(p, managers, cfg.seed, model=model, progress=False).runs


def sim_gate(
    candidate: Path, current: Path | None, grid: ResourceGrid, cfg: Any, cache: dict
) -> dict:
    """The simulator half of the gate: the candidate, the running model (none: nothing extra)
    and both rules on the same held-out workload, compared per invocation (paired bootstrap,
    ``training.evidence.sim_report``). It passes only if the candidate's mean RFET beats each of
    them by more than ``cfg.min_gain`` at the 95% interval's upper bound, its OOM failures are
    at most the fewest of theirs plus ``cfg.max_failure_increase``, and its share of RFET > 1.2
    is no higher than the running model's. ``cache`` keeps the others' runs (``SimKey``) from one
    update to the next, so only the candidate is simulated anew."""
    wanted: dict[str, SimKey] = {m: (cfg.preset, cfg.seed, m) for m in RULE_MANAGERS}
    running_sha = None
    if current is not None:
        running_sha = hashlib.sha256(current.read_bytes()).hexdigest()
        wanted = {"running": (cfg.preset, cfg.seed, running_sha), **wanted}
    missing_rules = [m for m in RULE_MANAGERS if wanted[m] not in cache]
    if missing_rules:
        for m, r in _sim_runs(grid, cfg, missing_rules).items():
            cache[wanted[m]] = r
    if current is not None and wanted["running"] not in cache:
        cache[wanted["running"]] = _sim_runs(grid, cfg, ["learned"], current)["learned"]
    for stale in set(cache) - set(wanted.values()):  # a replaced running model, another preset
        del cache[stale]
    runs = {"candidate": _sim_runs(grid, cfg, ["learned"], candidate)["learned"]}
    runs.update({m: cache[k] for m, k in wanted.items()})
    rows = sim_report({m: [r] for m, r in runs.items()})
    cand = rows["candidate"]
    others = [m for m in runs if m != "candidate"]
    reasons = []
    vs = {}
    for m in others:
        d = cand["vs"][m]
        lo, hi = d["mean_rfet_diff_ci"]
        ok = bool(hi < -cfg.min_gain)  # NaN (no interval) fails
        vs[m] = {"mean_rfet_diff": d["mean_rfet_diff"], "mean_rfet_diff_ci": [lo, hi], "passed": ok}
        if not ok:
            reasons.append(
                f"mean RFET does not beat {NAMES[m]}'s by more than {cfg.min_gain:g}: "
                f"candidate - {m} = {d['mean_rfet_diff']:+.5f}, 95% interval "
                f"[{lo:+.5f}, {hi:+.5f}]"
            )
    fewest = min(others, key=lambda m: rows[m]["failures"])
    allowed = rows[fewest]["failures"] + cfg.max_failure_increase
    if cand["failures"] > allowed:
        reasons.append(
            f"{cand['failures']} OOM failures, more than {NAMES[fewest]}'s "
            f"{rows[fewest]['failures']} + {cfg.max_failure_increase}"
        )
    if "running" in rows and cand["slowdown_frac_1_2"] > rows["running"]["slowdown_frac_1_2"]:
        reasons.append(
            f"share of RFET > 1.2 {cand['slowdown_frac_1_2']:.3%} above the running model's "
            f"{rows['running']['slowdown_frac_1_2']:.3%}"
        )
    figures = ("mean_rfet", "mean_rfet_ci", "slowdown_frac_1_2", "failures")
    return {
        "preset": cfg.preset,
        "seed": cfg.seed,
        "invocations": cand["invocations"],
        "running_sha256": running_sha,
        "min_gain": cfg.min_gain,
        "max_failures": allowed,
        "managers": {m: {k: row[k] for k in figures} for m, row in rows.items()},
        "vs": vs,
        "passed": not reasons,
        "reasons": reasons,
    }


def real_gate(
    candidate: Path, current: Path | None, records: list[dict], grid: ResourceGrid, cfg: Any
) -> dict:
    """The real-data half of the gate: the newest ``cfg.real_window`` real decisions on this grid
    and feature encoding (``readable``) replayed through the candidate and the running model
    (none: the daemon's fallback rule); the candidate's predicted slowdown and failure rates may
    exceed the running model's by ``cfg.real_max_increase`` plus two standard errors."""
    real = [r for r in records if readable(r, grid)][-cfg.real_window :]
    if not real:
        return {"records": 0, "passed": True, "reasons": [], "note": "no real records on this grid"}
    cur_scorer = OnnxScorer(current.read_bytes()) if current is not None else fallback_scorer()
    cand_r = real_rates(OnnxScorer(candidate.read_bytes()), real, grid, cfg.slowdown_rfet)
    cur_r = real_rates(cur_scorer, real, grid, cfg.slowdown_rfet)
    n = len(real)

    def allowed(p: float) -> float:
        # tolerance + two standard errors of the current rate: a few records that flip on a
        # small sample are noise, not a regression
        return p + cfg.real_max_increase + 2.0 * math.sqrt(max(p * (1 - p), 1.0 / n) / n)

    reasons = [
        f"predicted {what} rate on {n} recent real records {cand_r[k]:.3%}, above the allowed "
        f"{allowed(cur_r[k]):.3%}"
        for what, k in (("slowdown", "pred_slowdown_rate"), ("failure", "pred_failure_rate"))
        if cand_r[k] > allowed(cur_r[k])
    ]
    return {
        "records": n,
        "candidate": cand_r,
        "current": cur_r,
        "observed": observed_rates(real, None, cfg.slowdown_rfet),
        "passed": not reasons,
        "reasons": reasons,
    }


def gate(
    candidate: Path,
    current: Path | None,
    records: list[dict],
    grid: ResourceGrid,
    cfg: Any,
    sim_cache: dict | None = None,
) -> dict:
    """The promotion gate's report; ``report['passed']`` says whether to promote and
    ``report['reason']`` why (every failed check, or whom the candidate beat)."""
    sim = sim_gate(candidate, current, grid, cfg, sim_cache if sim_cache is not None else {})
    real = real_gate(candidate, current, records, grid, cfg)
    passed = bool(sim["passed"] and real["passed"])
    beaten = ", ".join(NAMES[m] for m in sim["vs"])
    return {
        "sim": sim,
        "real": real,
        "passed": passed,
        "reason": f"beats {beaten} in the simulator; no worse on recent real records"
        if passed
        else "; ".join(sim["reasons"] + real["reasons"]),
    }


# ------------------------------------------------------------------------------------ learner
HISTORY_LEN = 100
"""Updates kept in ``/debug/learner``'s history, each gate decision with its figures."""
HISTORY_KEYS = ("update", "time", "result", "version", "reason", "duration_s", "gate")


class Learner:
    def __init__(self, cfg: Any, store: Any, registry: Any, metrics: Any) -> None:
        self.cfg = cfg
        self.lcfg = cfg.learner
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.grid = cfg.grid
        self.work = Path(cfg.data_dir) / "candidates"
        self.work.mkdir(parents=True, exist_ok=True)
        self.last_batch_id = 0
        self.updates = 0
        self.history: list[dict] = []
        self.last: dict | None = None
        self._sim_cache: dict = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="faasrm-learn")
        torch.set_num_threads(1)

    def due(self) -> bool:
        return self.store.rewarded_since(self.last_batch_id) >= self.lcfg.min_records

    def _base_agent(self) -> tuple[Agent, Any, str]:
        latest = self.registry.latest()
        agent = Agent()
        if latest is not None and latest.checkpoint_path is not None:
            agent.load_state_dict(load_checkpoint(latest.checkpoint_path)["agent"])
            return agent, latest, f"version {latest.version}"
        if self.lcfg.init_checkpoint:
            agent.load_state_dict(load_checkpoint(self.lcfg.init_checkpoint)["agent"])
            return agent, latest, self.lcfg.init_checkpoint
        if latest is not None:
            raise LookupError(
                f"version {latest.version} has no agent checkpoint to continue from "
                "(publish with --checkpoint, or set learner.init_checkpoint)"
            )
        torch.manual_seed(self.lcfg.seed)
        return Agent(), None, "fresh agent"

    def step(self) -> dict:
        """One update; never raises for a refused candidate (the report says why)."""
        t0 = time.perf_counter()
        self.updates += 1
        upto = self.store.max_id()
        records = self.store.recent(max(self.lcfg.window_records, self.cfg.gate.real_window))
        out: dict[str, Any] = {"update": self.updates, "time": time.time(), "records": len(records)}
        try:
            agent, base, source = self._base_agent()
        except LookupError as exc:
            out.update(result="skipped", reason=str(exc))
            self.last_batch_id = upto
            return self._done(out, t0)
        b = records_to_batch(records[-self.lcfg.window_records :], self.grid)
        if b is None:
            out.update(result="skipped", reason="no rewarded records on this grid")
            self.last_batch_id = upto
            return self._done(out, t0)
        torch.manual_seed(self.lcfg.seed + self.updates)
        agent.train()
        try:
            losses = ppo_update(agent, b, self.lcfg, seed=self.lcfg.seed + self.updates)
        except Diverged as exc:  # nothing exported: no candidate to gate, publish or clean up
            out.update(base=source, result="rejected", reason=f"training diverged: {exc}")
            log.error("update diverged", extra={"reason": str(exc), "base": source})
            self.last_batch_id = upto
            return self._done(out, t0)
        agent.eval()
        from training.export import export

        cand = self.work / f"candidate-{self.updates:06d}.onnx"
        out.update(base=source, losses=losses)
        self.last_batch_id = upto  # whatever the gate says, the same data is not tried again
        try:
            meta = export(
                agent, cand, args={"online": True, "base": source, **losses}, grid=self.grid
            )
            self._judge(agent, cand, meta, base, records, out)
        finally:
            cand.unlink(missing_ok=True)
            Path(str(cand) + ".json").unlink(missing_ok=True)
        return self._done(out, t0)

    def _judge(
        self, agent: Agent, cand: Path, meta: dict, base: Any, records: list[dict], out: dict
    ) -> None:
        """Gate the exported candidate and promote it if it passes; ``out`` gets the result and
        why. A gate that raises is an "error" with its reason: recorded like any decision."""
        try:
            report = gate(
                cand,
                base.onnx_path if base else None,
                records,
                self.grid,
                self.cfg.gate,
                self._sim_cache,
            )
        except Exception as exc:  # noqa: BLE001 (a missing file, a simulator bug: say which)
            out.update(result="error", reason=f"the gate failed: {type(exc).__name__}: {exc}")
            log.exception("the gate failed", extra={"candidate": str(cand)})
            return
        for check in ("sim", "real"):
            self.metrics.gate.labels(check, "pass" if report[check]["passed"] else "fail").inc()
        out.update(gate=report)
        if not report["passed"]:
            out.update(result="rejected", reason=report["reason"])
            log.info("candidate refused by the gate", extra={"gate": report})
            return
        buf = io.BytesIO()
        torch.save({"agent": agent.state_dict(), "args": {"online": True}}, buf)
        try:
            v = self.registry.add(
                cand.read_bytes(),
                meta,
                report,
                buf.getvalue(),
                source="online",
                replaces=base.version if base else 0,
            )
        except (ModelRejected, Superseded) as exc:
            out.update(result="rejected", reason=f"the registry refused it: {exc}")
            log.error("candidate refused by the registry", extra={"reason": str(exc)})
            return
        out.update(result="promoted", version=v.version, sha256=v.sha256, reason=report["reason"])
        log.info("candidate promoted", extra={"version": v.version, "gate": report})

    def _done(self, out: dict, t0: float) -> dict:
        out["duration_s"] = round(time.perf_counter() - t0, 3)
        self.metrics.updates.labels(out["result"]).inc()
        self.metrics.update_duration.observe(out["duration_s"])
        self.last = out
        self.history.append({k: out.get(k) for k in HISTORY_KEYS})
        del self.history[:-HISTORY_LEN]
        return out

    def status(self) -> dict:
        return {
            "enabled": True,
            "updates": self.updates,
            "last_batch_id": self.last_batch_id,
            "due": self.due(),
            "last": self.last,
            "history": self.history,
        }

    def close(self) -> None:
        self.executor.shutdown(wait=True)


async def learn_loop(svc: Any) -> None:
    learner: Learner = svc.learner
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(svc.cfg.learner.interval_s)
        try:
            due = await loop.run_in_executor(svc.db, learner.due)
            if not due:
                continue
            out = await loop.run_in_executor(learner.executor, learner.step)
        except Exception:
            log.exception("online update failed")
            svc.metrics.updates.labels("error").inc()
            continue
        if out.get("result") == "promoted":
            svc.promoted()
