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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sidecar.core.grid import ResourceGrid
from training.baselines import BASELINES, RULE_MANAGERS, Choices, Learned, Manager, Rule
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
    """A finished run's per-invocation arrays, in seconds, cores and MB; the allocation is the
    time-averaged one (core- and MB-seconds held over the execution time: give-backs included)."""
    r = sim.results
    wl, g = sim.wl, sim.grid
    return SimRun(
        exec_s=r.exec_s.copy(),
        baseline_s=r.baseline_s.copy(),
        response_s=r.queue_s + r.cold_s + r.exec_s,
        failed=r.failed.copy(),
        cpu_cores=r.cpu_held / r.exec_s,
        mem_mb=r.mem_held / r.exec_s,
        user_cores=wl.user_cpu[wl.fn] * g.cpu_unit_cores,
        user_mb=wl.user_mem[wl.fn] * g.mem_unit_mb,
    )


def metrics(sim: ClusterSim) -> dict[str, float]:
    """The evaluation figures of a finished run (all invocations).

    ``alloc_cpu_ratio`` / ``alloc_mem_ratio``: the core-seconds and MB-seconds held (allocation
    x execution time, give-backs included, summed) over what the user's sizes would have held
    for the same invocations' execution times at the user's size (Fixed's, the counterfactual).
    ``give_back_frac``: the share of invocations that gave a resource back mid-run."""
    r = sim.results
    wl, g = sim.wl, sim.grid
    rfet = r.exec_s / r.baseline_s
    response = r.queue_s + r.cold_s + r.exec_s
    user_cpu = wl.user_cpu[wl.fn]
    user_mem = wl.user_mem[wl.fn]
    user_cores = user_cpu * g.cpu_unit_cores
    user_mb = user_mem * g.mem_unit_mb
    # the quantile ``training.evidence`` pools seeds with: a seed's own figure is that seed's
    pct = lambda x, q: float(np.percentile(x, q, method="inverted_cdf"))  # noqa: E731
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
        "alloc_cpu_ratio": float(r.cpu_held.sum() / (user_cores * r.baseline_s).sum()),
        "alloc_mem_ratio": float(r.mem_held.sum() / (user_mb * r.baseline_s).sum()),
        "give_backs": int(r.give_backs.sum()),
        "give_back_frac": float(np.mean(r.give_backs > 0)),
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
    choices: dict[str, Choices] = field(default_factory=dict)
    """The learned policy's choices beside the rules' (``Choices``), when it ran."""


def make_manager(
    name: str, model: str | Path | None = None, grid: ResourceGrid | None = None
) -> Manager:
    """``learned`` without a ``model``: the shipped model trained for ``grid``; ``rule`` and
    ``smallest``: the daemon's model-free rules. A model a host would refuse (another feature
    schema or grid) raises ``sidecar.models.ModelRejected``."""
    if name == "learned":
        from sidecar.models import default_model_path

        grid = grid or ResourceGrid()
        return Learned.from_onnx(model or default_model_path(grid), grid)
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
    for mgr in built:
        if isinstance(mgr, Learned) and mgr.name == "learned":
            mgr.track_choices = True
    out: dict[str, dict[str, float]] = {}
    rfet: dict[str, np.ndarray] = {}
    exec_s: dict[str, np.ndarray] = {}
    wall: dict[str, float] = {}
    runs: dict[str, SimRun] = {}
    choices: dict[str, Choices] = {}
    sim = ClusterSim(wl, preset.cluster, preset.grid, preset.safeguard)
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        for name, mgr in zip(managers, built):
            task = bar.add_task(f"{name:>8}", total=wl.n_invocations)
            wall[name] = run(sim, mgr, lambda k, task=task: bar.advance(task, k))
            out[name] = metrics(sim)
            rfet[name] = sim.results.exec_s / sim.results.baseline_s
            exec_s[name] = sim.results.exec_s.copy()
            runs[name] = sim_run(sim)
            if isinstance(mgr, Learned) and mgr.choices is not None:
                choices[name] = mgr.choices
    return Evaluation(preset.name, seed, out, rfet, exec_s, wall, runs, choices)


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
    pooled = sim_report(
        {m: [ev.runs[m] for ev in per_seed] for m in managers},
        choices={m: [ev.choices[m] for ev in per_seed] for m in per_seed[0].choices},
    )
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
    return "\n".join([title, line(head), *(line(r) for r in rows), *render_choices(ev.pooled)])


def render_choices(pooled: dict[str, dict]) -> list[str]:
    """One line per learned manager and rule: how often it chose unlike the rule, and what those
    choices did to mean RFET and to MB-seconds against the rule's own run of them."""
    out = []
    for name, row in pooled.items():
        ch = row.get("choices")
        if not ch:
            continue
        out.append(
            f"{name}: a choice in {ch['with_choice']['value']:.1%} of decisions (the safeguard "
            "allowed more than one candidate)"
        )
        for rule in RULE_MANAGERS:
            text = f"  unlike {rule} in {ch[f'{rule}/differs']['value']:.1%} of decisions"
            if f"{rule}/mean_rfet_diff" in ch and ch[f"{rule}/differs"]["value"] > 0:
                d, r = ch[f"{rule}/mean_rfet_diff"], ch[f"{rule}/mem_held_ratio"]
                text += (
                    f"; on those, mean RFET minus {rule}'s {d['value']:+.4f} "
                    f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}], MB-seconds x{r['value']:.3f} "
                    f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"
                )
            out.append(text)
    return out


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


def plot_front(results: dict[str, dict], out_dir: str | Path, title: str, stem: str) -> Path:
    """Mean RFET against ``alloc_mem_ratio`` per manager (what users feel against what their
    allocations hold), with the 95% intervals as error bars when the figures have them
    (``--seeds``), as one PNG file ``<stem>_front.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, m in results.items():
        x, y = m["alloc_mem_ratio"], m["mean_rfet"]
        err = {}
        for axis, key, v in (("xerr", "alloc_mem_ratio_ci", x), ("yerr", "mean_rfet_ci", y)):
            if key in m:
                lo, hi = m[key]
                err[axis] = [[max(0.0, v - lo)], [max(0.0, hi - v)]]
        ax.errorbar([x], [y], fmt="o", capsize=3, label=name, **err)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("alloc_mem_ratio (MB-seconds held / the user's sizes')")
    ax.set_ylabel("mean RFET")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{stem}_front.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- capacity
CAPACITY_SLACK = 1.5
"""A manager holds a load while its p98 response time stays within this multiple of Fixed's at
load 1.0 (issue 13: where harvesting must pay)."""
CAPACITY_FIGURES = (
    "p98_response_s",
    "mean_rfet",
    "alloc_cpu_ratio",
    "alloc_mem_ratio",
)


def capacity_of(p98: dict[float, float], reference: float, slack: float = CAPACITY_SLACK) -> float:
    """The highest load such that it and every lower load evaluated kept p98 response time
    within ``slack`` x ``reference``; 0.0 when even the lowest did not."""
    held = 0.0
    for load in sorted(p98):
        if not p98[load] <= slack * reference:
            break
        held = load
    return held


def evaluate_capacity(
    preset: Preset,
    managers: list[str],
    seeds: list[int],
    loads: list[float],
    model: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Every manager at every load on each seed's workload, arrivals compressed by the load
    (``Workload.scaled``: the same invocations, so loads stay paired), figures pooled over the
    seeds with their intervals (``evaluate_seeds``' method), and each manager's ``capacity``
    (``capacity_of``) against Fixed's p98 response time at load 1.0, pooled and per seed.

    ``fixed`` is evaluated whether named or not (it is the reference); ``loads`` must hold 1.0.
    Runs load by load, so only one load's per-invocation arrays are in memory at a time."""
    loads = sorted(set(loads))
    if 1.0 not in loads:
        raise ValueError("the loads must include 1.0: Fixed's p98 response time there is the bar")
    managers = ["fixed", *(m for m in managers if m != "fixed")]
    workloads = {s: preset.build(s) for s in seeds}
    out: dict = {m: {"loads": {}} for m in managers}
    for load in loads:
        per_seed = [
            evaluate(preset, managers, s, model, workloads[s].scaled(load), progress) for s in seeds
        ]
        pooled = sim_report(
            {m: [ev.runs[m] for ev in per_seed] for m in managers},
            choices={m: [ev.choices[m] for ev in per_seed] for m in per_seed[0].choices},
        )
        for m in managers:
            row = {k: pooled[m][k] for k in ("invocations", "failures", "failures_per_100k")}
            for k in CAPACITY_FIGURES:
                row[k], row[k + "_ci"] = pooled[m][k], pooled[m][k + "_ci"]
            row["per_seed"] = {
                str(ev.seed): {k: ev.results[m][k] for k in (*CAPACITY_FIGURES, "failures")}
                for ev in per_seed
            }
            out[m]["loads"][load] = row
    ref = out["fixed"]["loads"][1.0]
    reference = {
        "pooled": ref["p98_response_s"],
        "per_seed": {s: r["p98_response_s"] for s, r in ref["per_seed"].items()},
    }
    for res in out.values():
        rows = res["loads"]
        res["capacity"] = capacity_of(
            {x: r["p98_response_s"] for x, r in rows.items()}, reference["pooled"]
        )
        res["capacity_per_seed"] = {
            s: capacity_of({x: r["per_seed"][s]["p98_response_s"] for x, r in rows.items()}, ref_s)
            for s, ref_s in reference["per_seed"].items()
        }
        res["loads"] = {f"{x:g}": r for x, r in rows.items()}
    return {
        "config": {
            "preset": preset.name,
            "seeds": list(seeds),
            "loads": loads,
            "managers": managers,
            "slack": CAPACITY_SLACK,
        },
        "reference_p98_response_s": reference,
        "results": out,
    }


def render_capacity(report: dict) -> str:
    """Per manager and load: p98 response time and mean RFET with their intervals, OOM kills;
    then each manager's capacity, pooled and per seed."""
    cfg = report["config"]
    head = ["manager", "load", "p98 resp s", "95% interval", "mean RFET", "95% interval", "OOM"]
    rows = []
    for m, res in report["results"].items():
        for load, r in res["loads"].items():
            lo, hi = r["p98_response_s_ci"]
            rlo, rhi = r["mean_rfet_ci"]
            rows.append(
                [
                    m,
                    load,
                    f"{r['p98_response_s']:.1f}",
                    f"[{lo:.1f}, {hi:.1f}]",
                    f"{r['mean_rfet']:.4f}",
                    f"[{rlo:.4f}, {rhi:.4f}]",
                    str(r["failures"]),
                ]
            )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    ref = report["reference_p98_response_s"]["pooled"]
    seeds = ",".join(map(str, cfg["seeds"]))
    lines = [f"preset {cfg['preset']}, seeds {seeds} pooled", line(head), *map(line, rows)]
    lines.append(
        f"capacity: the highest load held within {cfg['slack']:g}x Fixed's p98 response time "
        f"at load 1.0 ({ref:.1f} s), pooled (per seed)"
    )
    for m, res in report["results"].items():
        per = ", ".join(f"{s}: {c:g}" for s, c in res["capacity_per_seed"].items())
        lines.append(f"  {m:>8}  {res['capacity']:g}  ({per})")
    return "\n".join(lines)
