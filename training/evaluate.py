"""Evaluation: every manager on the same workload and seed; a table, JSON and CDF plots.

RFET (relative function execution time) of an invocation = its execution time under the manager
divided by its execution time at the user's size: the same invocation (same input, same noise
draw) on the same server under the same load from the other invocations, with only its own
allocation changed. The simulator computes that counterfactual exactly, so Fixed has RFET 1.0.
Execution time excludes queueing and cold start; response time (reported beside it) includes both.
An OOM-killed invocation's execution time includes the killed run and the retry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sidecar.core.grid import ResourceGrid
from training.baselines import BASELINES, RULE_MANAGERS, Learned, Manager, Rule
from training.evidence import SimRun, sim_report
from training.sim.cluster import ClusterSim
from training.sim.presets import Preset
from training.sim.workload import Workload

JSON_KEYS = (
    "mean_rfet",
    "p98_rfet",
    "p98_duration_s",
    "harvested_frac",
    "accelerated_frac",
    "slowdown_frac_1_2",
    "failures",
    "invocations",
)
"""The keys every consumer of ``sim eval --json`` may rely on (more are written beside them)."""


def run(sim: ClusterSim, manager: Manager, tick: Callable[[int], None] | None = None) -> float:
    """Drive one manager through the whole workload; returns wall seconds."""
    t0 = time.perf_counter()
    sim.reset()
    manager.reset(sim)
    n = 0
    while (req := sim.next_request()) is not None:
        if sim.finished:
            for inv in sim.finished:
                manager.observe(sim, inv)
            sim.finished.clear()
        sim.apply(manager.decide(sim, req))
        n += 1
        if tick is not None and n % 5000 == 0:
            tick(5000)
    sim.run_to_end()
    if tick is not None:
        tick(n % 5000)
    return time.perf_counter() - t0


def sim_run(sim: ClusterSim) -> SimRun:
    """A finished run's per-invocation arrays, in seconds, cores and MB."""
    r = sim.results
    wl, g = sim.wl, sim.grid
    return SimRun(
        exec_s=r.exec_s.copy(),
        baseline_s=r.baseline_s.copy(),
        response_s=r.queue_s + r.cold_s + r.exec_s,
        failed=r.failed.copy(),
        cpu_cores=r.cpu * g.cpu_unit_cores,
        mem_mb=r.mem * g.mem_unit_mb,
        user_cores=wl.user_cpu[wl.fn] * g.cpu_unit_cores,
        user_mb=wl.user_mem[wl.fn] * g.mem_unit_mb,
    )


def metrics(sim: ClusterSim) -> dict[str, float]:
    """The evaluation figures of a finished run (all invocations).

    ``alloc_cpu_ratio`` / ``alloc_mem_ratio``: the allocated core-seconds and MB-seconds
    (allocation x execution time, summed) over what the user's sizes would have held for the
    same invocations' execution times at the user's size (Fixed's, the counterfactual)."""
    r = sim.results
    wl = sim.wl
    rfet = r.exec_s / r.baseline_s
    response = r.queue_s + r.cold_s + r.exec_s
    user_cpu = wl.user_cpu[wl.fn]
    user_mem = wl.user_mem[wl.fn]
    pct = lambda x, q: float(np.percentile(x, q))  # noqa: E731
    return {
        "invocations": int(len(rfet)),
        "mean_rfet": float(rfet.mean()),
        "p50_rfet": pct(rfet, 50),
        "p98_rfet": pct(rfet, 98),
        "p99_rfet": pct(rfet, 99),
        "p98_duration_s": pct(r.exec_s, 98),
        "p99_duration_s": pct(r.exec_s, 99),
        "mean_response_s": float(response.mean()),
        "p98_response_s": pct(response, 98),
        "p99_response_s": pct(response, 99),
        "harvested_frac": float(np.mean((r.cpu < user_cpu) | (r.mem < user_mem))),
        "accelerated_frac": float(np.mean((r.cpu > user_cpu) | (r.mem > user_mem))),
        "slowdown_frac_1_1": float(np.mean(rfet > 1.1)),
        "slowdown_frac_1_2": float(np.mean(rfet > 1.2)),
        "failures": int(r.failed.sum()),
        "cold_starts": int(sim.cold_starts),
        "mean_queue_s": float(r.queue_s.mean()),
        "p99_queue_s": pct(r.queue_s, 99),
        "mean_reward": float(r.reward.mean()),
        "gmean_rfet": float(np.exp(np.log(rfet).mean())),
        "alloc_cpu_ratio": float((r.cpu * r.exec_s).sum() / (user_cpu * r.baseline_s).sum()),
        "alloc_mem_ratio": float((r.mem * r.exec_s).sum() / (user_mem * r.baseline_s).sum()),
    }


@dataclass
class Evaluation:
    preset: str
    seed: int
    results: dict[str, dict[str, float]]
    rfet: dict[str, np.ndarray]
    exec_s: dict[str, np.ndarray]
    wall_s: dict[str, float]
    runs: dict[str, SimRun]


def make_manager(
    name: str, model: str | Path | None = None, grid: ResourceGrid | None = None
) -> Manager:
    """``learned`` without a ``model``: the shipped model trained for ``grid``; ``rule`` and
    ``smallest``: the daemon's model-free rules."""
    if name == "learned":
        from sidecar.models import default_model_path

        return Learned.from_onnx(model or default_model_path(grid))
    if name in RULE_MANAGERS:
        return Rule(name, RULE_MANAGERS[name])
    try:
        return BASELINES[name]()
    except KeyError:
        known = ", ".join([*BASELINES, *RULE_MANAGERS, "learned"])
        raise ValueError(f"unknown manager {name!r}; choose from {known}") from None


def evaluate(
    preset: Preset,
    managers: list[str],
    seed: int,
    model: str | Path | None = None,
    workload: Workload | None = None,
    progress: bool = True,
) -> Evaluation:
    """Run each manager on the identical workload (same trace, draws and seed)."""
    wl = workload or preset.build(seed)
    built = [make_manager(m, model, preset.grid) for m in managers]
    out: dict[str, dict[str, float]] = {}
    rfet: dict[str, np.ndarray] = {}
    exec_s: dict[str, np.ndarray] = {}
    wall: dict[str, float] = {}
    runs: dict[str, SimRun] = {}
    sim = ClusterSim(wl, preset.cluster, preset.grid)
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        for name, mgr in zip(managers, built):
            task = bar.add_task(f"{name:>8}", total=wl.n_invocations)
            wall[name] = run(sim, mgr, lambda k, task=task: bar.advance(task, k))
            out[name] = metrics(sim)
            rfet[name] = sim.results.exec_s / sim.results.baseline_s
            exec_s[name] = sim.results.exec_s.copy()
            runs[name] = sim_run(sim)
    return Evaluation(preset.name, seed, out, rfet, exec_s, wall, runs)


@dataclass
class SeedsEvaluation:
    """Several seeds: the pooled figures with their intervals, and each seed's own evaluation."""

    preset: str
    seeds: list[int]
    pooled: dict[str, dict]
    per_seed: list[Evaluation]


def evaluate_seeds(
    preset: Preset,
    managers: list[str],
    seeds: list[int],
    model: str | Path | None = None,
    progress: bool = True,
) -> SeedsEvaluation:
    """Every manager on each seed's workload, then figures pooled over the seeds with intervals
    from the bootstrap over seeds and invocations (``training.evidence.sim_report``)."""
    per_seed = [evaluate(preset, managers, s, model=model, progress=progress) for s in seeds]
    pooled = sim_report({m: [ev.runs[m] for ev in per_seed] for m in managers})
    for name, row in pooled.items():
        row["per_seed"] = {str(ev.seed): ev.results[name] for ev in per_seed}
    return SeedsEvaluation(preset.name, list(seeds), pooled, per_seed)


SEEDS_COLUMNS = (
    ("mean_rfet", "mean RFET", "{:.4f}", True),
    ("gmean_rfet", "gmean", "{:.4f}", False),
    ("p98_rfet", "p98", "{:.3f}", False),
    ("p98_response_s", "p98 resp s", "{:.1f}", True),
    ("slowdown_frac_1_2", ">1.2", "{:.2%}", False),
    ("failures_per_100k", "OOM/100k", "{:.1f}", False),
    ("alloc_cpu_ratio", "alloc CPU", "{:.3f}", False),
    ("alloc_mem_ratio", "alloc MB", "{:.3f}", False),
)


def render_seeds_table(ev: SeedsEvaluation) -> str:
    """Pooled figures, with the 95% interval beside the main ones."""
    head = ["manager"]
    for _, h, _, ci in SEEDS_COLUMNS:
        head += [h, "95% interval"] if ci else [h]
    rows = []
    for name, m in ev.pooled.items():
        row = [name]
        for k, _, fmt, ci in SEEDS_COLUMNS:
            row.append(fmt.format(m[k]))
            if ci:
                lo, hi = m[k + "_ci"]
                row.append(f"[{fmt.format(lo)}, {fmt.format(hi)}]")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    n = next(iter(ev.pooled.values()))["invocations"] if ev.pooled else 0
    seeds = ",".join(map(str, ev.seeds))
    title = f"preset {ev.preset}, seeds {seeds} pooled, {n} invocations"
    return "\n".join([title, line(head), *(line(r) for r in rows)])


def write_seeds_json(ev: SeedsEvaluation, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(ev.pooled, indent=2, sort_keys=True) + "\n")


TABLE_COLUMNS = (
    ("mean_rfet", "mean RFET", "{:.3f}"),
    ("p50_rfet", "p50", "{:.3f}"),
    ("p98_rfet", "p98", "{:.3f}"),
    ("p99_rfet", "p99", "{:.3f}"),
    ("p98_duration_s", "p98 exec s", "{:.1f}"),
    ("p99_duration_s", "p99 exec s", "{:.1f}"),
    ("p98_response_s", "p98 resp s", "{:.1f}"),
    ("harvested_frac", "harvested", "{:.1%}"),
    ("accelerated_frac", "accel.", "{:.1%}"),
    ("slowdown_frac_1_1", ">1.1", "{:.2%}"),
    ("slowdown_frac_1_2", ">1.2", "{:.2%}"),
    ("failures", "OOM", "{:d}"),
    ("cold_starts", "cold", "{:d}"),
    ("mean_queue_s", "queue s", "{:.2f}"),
)


def render_table(ev: Evaluation) -> str:
    """A plain-text table (also used in the README)."""
    head = ["manager", *(h for _, h, _ in TABLE_COLUMNS)]
    rows = [
        [name, *(fmt.format(m[k]) for k, _, fmt in TABLE_COLUMNS)] for name, m in ev.results.items()
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    n = next(iter(ev.results.values()))["invocations"] if ev.results else 0
    title = f"preset {ev.preset}, seed {ev.seed}, {n} invocations"
    return "\n".join([title, line(head), *(line(r) for r in rows)])


def write_json(ev: Evaluation, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(ev.results, indent=2, sort_keys=True) + "\n")


def plot_cdfs(ev: Evaluation, out_dir: str | Path) -> list[Path]:
    """CDF of RFET and of execution time per manager, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, data, xlabel, log in (
        ("rfet", ev.rfet, "RFET (execution time / at user's size)", True),
        ("exec", ev.exec_s, "execution time (s)", True),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, x in data.items():
            xs = np.sort(x)
            ax.plot(xs, np.linspace(0, 1, len(xs), endpoint=False), label=name)
        ax.set_xscale("log" if log else "linear")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("CDF of invocations")
        ax.set_title(f"{ev.preset} preset, seed {ev.seed}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        p = out / f"{ev.preset}_seed{ev.seed}_{key}_cdf.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths
