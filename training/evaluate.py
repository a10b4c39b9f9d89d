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


def metrics(sim: ClusterSim) -> dict[str, float]:
    """The evaluation figures of a finished run (all invocations)."""
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
    }


@dataclass
class Evaluation:
    preset: str
    seed: int
    results: dict[str, dict[str, float]]
    rfet: dict[str, np.ndarray]
    exec_s: dict[str, np.ndarray]
    wall_s: dict[str, float]


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
    sim = ClusterSim(wl, preset.cluster, preset.grid)
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        for name, mgr in zip(managers, built):
            task = bar.add_task(f"{name:>8}", total=wl.n_invocations)
            wall[name] = run(sim, mgr, lambda k, task=task: bar.advance(task, k))
            out[name] = metrics(sim)
            rfet[name] = sim.results.exec_s / sim.results.baseline_s
            exec_s[name] = sim.results.exec_s.copy()
    return Evaluation(preset.name, seed, out, rfet, exec_s, wall)


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
