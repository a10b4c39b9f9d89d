"""``faasrm bench agreement``: the simulator against a real run of the same slice and managers.

A real run (``faasrm bench real --records``, read with ``--real`` or run here) and the simulator
replay the same invocations (``invoker.schedule``: the same minutes, speedup and seed) under the
same managers. The simulated workload is built from measurements, not drawn
(``fitted_workload``):

* an invocation's duration at the user's size is its real reference time (the geometric mean of
  its Fixed executions), without noise, so the simulator starts from what was measured;
* a function's CPU share phi is ``faasrm bench curves``' fit of its measured CPU curve (time at
  0.25 / 0.5 / 1 / 2 cores); its parallelism p is fitted again with that phi, through the
  simulator's own duration model (``ClusterSim``, CFS staircase included: ``fit_cpu_sim``),
  since the curves' linear model takes a burst that fits one period's quota for fewer threads;
* an invocation's working set is the curves' working-set fit at its input (the idle worker plus
  a power law of the input), at most the user's memory (the user's size held every Fixed run);
  the warm worker's idle memory is the one measured; no memory-pressure slowdown, no cold
  start (the real containers are warm before the replay).

The host is one server with this machine's cores and memory, on the real run's grid, with
admission that never binds (the real invoker has no admission queue). What the simulator cannot
express: one invocation at a time per container (the real invoker queues later arrivals; the
simulator runs them side by side), and the safeguard's input floor and mid-invocation
give-backs (the simulated safeguard sees no usage or input size). docs/agreement.md has a run.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.safeguard import SafeguardConfig
from training.evaluate import make_manager, run, sim_run
from training.evidence import Replays, reference_times, sim_report
from training.invoker.curves import QUOTAS, working_set_mb
from training.invoker.invoker import Arrival, Measurement, kind, schedule
from training.sim.cluster import ClusterConfig, ClusterSim, Request
from training.sim.workload import Workload

MANAGERS = "fixed,rule,smallest,learned"
COMPARED = ("gmean_rfet", "slowdown_frac_1_2", "harvested_frac", "accelerated_frac")
"""The figures compared side by side; ``diff`` holds sim - real for each."""
REAL_KEYS = (
    "invocations",
    *COMPARED,
    "gmean_rfet_ci",
    "slowdown_frac_1_2_ci",
    "mean_rfet",
    "p98_rfet",
    "alloc_cpu_ratio",
    "alloc_mem_ratio",
    "failures",
    "oom_kills",
    "verdict",
)
"""What the real block copies from ``bench real``'s STATS of a manager."""
QUEUED_S = 0.05
"""A real invocation that started this much after its arrival waited for its container."""
BUSY_LOAD = 0.5
"""Curves measured at a load average above this share of the host's cores are flagged: every
function then gets a share of a core and looks like it cannot use more (p ~ 0.5)."""
FIT_GRID = ResourceGrid(cpu_unit_cores=QUOTAS[0], cpu_units=round(QUOTAS[-1] / QUOTAS[0]))
"""The grid of the CPU fit: every quota of ``bench curves`` (0.25 to 2 cores) lies on it."""
FIT_P = np.geomspace(0.05, 8.0, 48)
"""The first pass of the fit of p; the second searches a 10x finer grid around its best point."""


# ------------------------------------------------------------------------------ the CPU fit
class _Given:
    """A simulator manager that runs invocation i at ``allocs[i]``."""

    name = "given"

    def __init__(self, allocs: Sequence[Alloc]) -> None:
        self.allocs = allocs

    def reset(self, sim: ClusterSim) -> None:
        pass

    def decide(self, sim: ClusterSim, req: Request) -> Alloc:
        return self.allocs[req.inv]

    def observe(self, sim: ClusterSim, inv: int) -> None:
        pass


def simulated_curves(
    quotas: Sequence[float],
    user_cores: float,
    user_s: float,
    candidates: Sequence[tuple[float, float]],
    host_cores: float,
) -> np.ndarray:
    """The simulator's time (s) of one invocation lasting ``user_s`` at ``user_cores``, alone on
    a host, at each quota, for every (phi, p) candidate: shape (candidates, quotas)."""
    g = FIT_GRID
    units = [g.cpu_units_ceil(q) for q in (*quotas, user_cores)]
    if any(abs(g.cores(u) - q) > 1e-9 for u, q in zip(units, (*quotas, user_cores))):
        raise ValueError(
            f"quotas {list(quotas)} and {user_cores} must be multiples of {g.cpu_unit_cores} core"
        )
    k, nq = len(candidates), len(quotas)
    phi, p = (np.array(x, dtype=float) for x in zip(*candidates))
    n = k * nq
    gap = 100.0 * user_s + 1.0  # each run ends long before the next arrives: no contention
    wl = Workload(
        n_functions=k,
        user_cpu=np.full(k, units[-1], dtype=np.int64),
        user_mem=np.ones(k, dtype=np.int64),
        parallelism=p,
        cpu_frac=phi,
        mem_pressure=np.zeros(k),
        worker_mb=np.zeros(k),
        arrival_s=np.arange(n) * gap,
        fn=np.repeat(np.arange(k, dtype=np.int64), nq),
        duration_s=np.full(n, user_s),
        working_set_mb=np.ones(n),
        noise=np.ones(n),
        cold_start_s=np.zeros(n),
        input_size=np.ones(n),
        spike=np.zeros(n, dtype=bool),
    )
    # static limits, as bench curves measures them (no give-back)
    cfg = ClusterConfig(servers=1, cores=host_cores, mem_mb=g.max_mb, give_back=False)
    sim = ClusterSim(wl, cfg, g)
    run(sim, _Given([Alloc(units[j % nq], 1) for j in range(n)]))
    return sim.results.exec_s.reshape(k, nq)


def fit_cpu_sim(
    quotas: Sequence[float],
    times_s: Sequence[float],
    user_cores: float,
    phi: float,
    host_cores: float,
) -> dict:
    """The parallelism p in [0.05, 8] with which the simulator, given the CPU share ``phi``,
    reproduces a measured CPU curve.

    Anchored at the measured time at the user's size (the simulator runs every invocation for
    its reference time there); least squares on relative error over a log grid of p, then once
    more on a 10x finer one around the best point."""
    q = [float(x) for x in quotas]
    t = np.asarray(times_s, dtype=float)
    anchor = int(np.argmin([abs(x - user_cores) for x in q]))
    user = q[anchor]
    ps = [float(x) for x in FIT_P]
    step = float(FIT_P[1] / FIT_P[0])
    for _ in range(2):
        sim_t = simulated_curves(q, user, float(t[anchor]), [(phi, x) for x in ps], host_cores)
        best = int(np.argmin((((sim_t - t) / t) ** 2).sum(axis=1)))
        p = ps[best]
        fitted = sim_t[best]
        ps = [float(np.clip(p * step**e, FIT_P[0], FIT_P[-1])) for e in np.linspace(-1, 1, 11)]
    return {
        "phi": float(phi),
        "p": p,
        "anchor_cores": user,
        "fitted_s": [float(x) for x in fitted],
        "max_rel_err": float(np.max(np.abs(fitted - t) / t)),
    }


# ------------------------------------------------------------------------- the workload
@dataclass(frozen=True)
class FunctionModel:
    """What the simulator is given of one real function."""

    name: str
    user_cpu_cores: float
    user_mem_mb: float
    cpu_frac: float  # phi, bench curves' fit
    parallelism: float  # p, fit_cpu_sim
    worker_mb: float  # the warm worker's idle memory
    working_set: dict  # bench curves' ws_fit (idle worker included)
    cpu_fit: dict

    def working_set_mb(self, size: float) -> float:
        return min(working_set_mb(self.working_set, size), self.user_mem_mb)


def function_models(curves: dict, users: dict[str, dict]) -> dict[str, FunctionModel]:
    """Every function of ``users`` (``bench real``'s ``functions``: the users' sizes of the run)
    fitted from ``bench curves``' JSON."""
    by_name = {c["function"]: c for c in curves["functions"]}
    missing = sorted(set(users) - set(by_name))
    if missing:
        raise ValueError(f"the curves have no {', '.join(missing)}: run bench curves on all")
    out = {}
    for name, user in users.items():
        c = by_name[name]
        if not c.get("ws_fit"):
            raise ValueError(f"{name}: the curves have no working-set fit (an older bench curves)")
        if not c.get("fit"):
            raise ValueError(f"{name}: the curves have no CPU fit (a 1-core point is needed)")
        fit = fit_cpu_sim(
            c["quotas"], c["cpu_times_s"], c["user_cpu"], c["fit"]["phi"], curves["cpus"]
        )
        out[name] = FunctionModel(
            name,
            float(user["user_cpu_cores"]),
            float(user["user_mem_mb"]),
            fit["phi"],
            fit["p"],
            float(c["idle_mb"]),
            c["ws_fit"],
            fit,
        )
    return out


def fitted_workload(
    arrivals: Sequence[Arrival],
    ref_s: np.ndarray,
    models: dict[str, FunctionModel],
    grid: ResourceGrid,
) -> Workload:
    """The real slice as a simulator workload: arrival i is invocation i, functions in the order
    of ``models``; ``ref_s[i]`` is its duration at the user's size (NaN: none measured, the
    function's geometric mean is used)."""
    t = np.array([a.t_s for a in arrivals], dtype=float)
    if np.any(np.diff(t) < 0):
        raise ValueError("arrivals must be sorted by time")
    names = list(models)
    fn = np.array([names.index(a.container) for a in arrivals], dtype=np.int64)
    ref = np.asarray(ref_s, dtype=float).copy()
    for f in range(len(names)):
        sel = fn == f
        ok = sel & np.isfinite(ref) & (ref > 0)
        ref[sel & ~ok] = float(np.exp(np.log(ref[ok]).mean())) if ok.any() else 1.0
    users = [grid.nearest(m.user_cpu_cores, m.user_mem_mb) for m in models.values()]
    user_mb = np.array([grid.mb(u.mem) for u in users])
    ws = np.array([models[a.container].working_set_mb(a.size) for a in arrivals])
    n = len(arrivals)
    return Workload(
        n_functions=len(names),
        user_cpu=np.array([u.cpu for u in users], dtype=np.int64),
        user_mem=np.array([u.mem for u in users], dtype=np.int64),
        parallelism=np.array([m.parallelism for m in models.values()]),
        cpu_frac=np.array([m.cpu_frac for m in models.values()]),
        mem_pressure=np.zeros(len(names)),
        worker_mb=np.array([m.worker_mb for m in models.values()]),
        arrival_s=t,
        fn=fn,
        duration_s=np.maximum(ref, 1e-3),
        working_set_mb=np.minimum(ws, user_mb[fn]),
        noise=np.ones(n),
        cold_start_s=np.zeros(n),
        input_size=np.array([a.size for a in arrivals], dtype=float),
        # the working-set fit knows no unannounced spike: a real one shows as an OOM kill there
        spike=np.zeros(n, dtype=bool),
    )


def host_config(cores: float, mem_mb: float) -> ClusterConfig:
    """One server like the real host: its cores (contention) and memory (what the learned policy
    sees as free); CPU admission never binds, as on the real invoker."""
    return ClusterConfig(servers=1, cores=cores, mem_mb=mem_mb, cpu_overcommit=1e9)


def node_box(
    settings: dict[str, dict[str, Any]], box: dict[str, Any] | None = None
) -> tuple[SafeguardConfig, bool, list[str]]:
    """The safeguard and the OOM hold a ``bench real`` sidecar decided under, and the settings
    the simulator does not model: from the ``box`` the run recorded (``real.sidecar_box``), else
    from its ``settings`` read under today's defaults (a run recorded before the boxes were)."""
    from training.invoker.real import sidecar_box

    box = box or sidecar_box(settings)
    known = {f.name for f in fields(SafeguardConfig)}
    safeguard = SafeguardConfig(**{k: v for k, v in box["safeguard"].items() if k in known})
    unmodelled = sorted(
        f"{sec}.{key}"
        for sec, kv in settings.items()
        for key, value in kv.items()
        if sec != "safeguard"
        and not (sec == "actuation" and key == "v1_memory_harvest" and value in ("hold", "hard"))
    )
    return safeguard, box["v1_memory_harvest"] == "hold", unmodelled


# ------------------------------------------------------------------------- both sides
def simulate(
    wl: Workload,
    managers: Sequence[str],
    grid: ResourceGrid,
    host: ClusterConfig,
    model: str | Path | None,
    names: Sequence[str],
    boxes: dict[str, tuple[SafeguardConfig, bool, list[str]]],
) -> dict[str, dict]:
    """Each manager on ``wl``, a sidecar (``smallest@tight`` too) in its box (``node_box``):
    the compared figures
    (with the simulator's own bootstrap interval over invocations), harvested / accelerated by
    the real invoker's rule (``invoker.kind``), and each function's geometric-mean RFET."""
    from training.invoker.real import base_manager

    runs = {}
    for name in managers:
        safeguard, hold, _ = boxes[name]
        sim = ClusterSim(wl, replace(host, oom_hold=hold), grid, safeguard)
        run(sim, make_manager(base_manager(name), model, grid))
        runs[name] = sim_run(sim)
    stats = sim_report({m: [r] for m, r in runs.items()})
    out = {}
    for name, r in runs.items():
        st = stats[name]
        kinds = [
            kind(uc, um, c, m)
            for uc, um, c, m in zip(r.user_cores, r.user_mb, r.cpu_cores, r.mem_mb, strict=True)
        ]
        log_rfet = np.log(r.exec_s / r.baseline_s)
        out[name] = {
            "invocations": st["invocations"],
            **{k: st[k] for k in ("gmean_rfet", "gmean_rfet_ci", "slowdown_frac_1_2")},
            "slowdown_frac_1_2_ci": st["slowdown_frac_1_2_ci"],
            "harvested_frac": kinds.count("harvested") / max(1, len(kinds)),
            "accelerated_frac": kinds.count("accelerated") / max(1, len(kinds)),
            **{k: st[k] for k in ("mean_rfet", "p98_rfet", "alloc_cpu_ratio", "alloc_mem_ratio")},
            "failures": st["failures"],
            "by_function": {
                f: float(np.exp(log_rfet[wl.fn == i].mean()))
                for i, f in enumerate(names)
                if np.any(wl.fn == i)
            },
        }
    return out


@dataclass
class RealRun:
    """A ``bench real --records`` JSON: its slice, its records and its figures."""

    data: dict
    arrivals: list[Arrival]
    records: dict[str, list[list[Measurement]]]

    @classmethod
    def of(cls, data: dict) -> RealRun:
        if not data.get("records"):
            raise ValueError("the real run has no records: run faasrm bench real with --records")
        cfg = data["config"]
        arrivals = schedule(cfg["minutes"], cfg["speedup"], cfg["seed"])
        records = {
            m: [[Measurement(**r) for r in rs] for rs in rounds]
            for m, rounds in data["records"].items()
        }
        for m, rounds in records.items():
            for rs in rounds:
                if len(rs) != len(arrivals) or any(
                    r.function != arrivals[r.idx].container or r.size != arrivals[r.idx].size
                    for r in rs
                ):
                    raise ValueError(
                        f"{m}'s records are not the slice schedule() gives for minutes "
                        f"{cfg['minutes']}, speedup {cfg['speedup']}, seed {cfg['seed']}"
                    )
        return cls(data, arrivals, records)

    def fixed(self) -> Replays:
        """Fixed's rounds as (round x invocation) arrays."""
        from training.invoker.real import replays

        return replays(self.records["fixed"], len(self.arrivals), 0)

    def reference_s(self) -> np.ndarray:
        """Each invocation's reference time: the geometric mean of its Fixed executions."""
        return reference_times(self.fixed())

    def block(self, manager: str) -> dict:
        st = self.data["results"][manager]
        flat = [r for rs in self.records.get(manager, []) for r in rs]
        return {
            **{k: st[k] for k in REAL_KEYS if k in st},
            "queued_frac": sum(r.start_s - r.arrival_s > QUEUED_S for r in flat)
            / max(1, len(flat)),
            "by_function": {f: b["gmean_rfet"] for f, b in st.get("by_function", {}).items()},
        }


def compare(sim: dict[str, dict], real: dict[str, dict]) -> dict[str, dict]:
    """Per manager (the real run's first, then any only simulated): both blocks, the absolute
    error of the geometric-mean RFET, sim - real for every compared figure and by function,
    whether the real interval holds the simulated figure; a manager one side lacks has that
    block None and ``missing`` naming the side."""
    out = {}
    for m in [*real, *(x for x in sim if x not in real)]:
        s, r = sim.get(m), real.get(m)
        row: dict[str, Any] = {"sim": s, "real": r, "abs_error_gmean_rfet": None, "diff": None}
        if s is None or r is None:
            row["missing"] = "sim" if s is None else "real"
            out[m] = row
            continue
        row["abs_error_gmean_rfet"] = abs(s["gmean_rfet"] - r["gmean_rfet"])
        row["diff"] = {k: s[k] - r[k] for k in COMPARED}
        lo, hi = r["gmean_rfet_ci"]
        row["sim_within_real_ci"] = bool(lo <= s["gmean_rfet"] <= hi)
        row["by_function"] = {
            f: {"sim": s["by_function"][f], "real": g, "error": s["by_function"][f] - g}
            for f, g in r["by_function"].items()
            if f in s["by_function"]
        }
        out[m] = row
    return out


def agreement(
    real_data: dict,
    curves: dict,
    managers: Sequence[str] | None = None,
    model: str | Path | None = None,
    host: tuple[float, float] | None = None,
) -> dict:
    """The whole report: the real run (``bench real --records``'s JSON) against the simulator
    running ``managers`` (default: the real run's) on the workload fitted from ``curves``.
    ``host``: (cores, MB) of the simulated server (default: this machine's)."""
    real = RealRun.of(real_data)
    cfg = real_data["config"]
    grid = ResourceGrid(**cfg["grid"])
    managers = list(managers or real_data["results"])
    model = model or cfg.get("model")
    if host is None:
        from sidecar.daemon import host_capacity

        host = host_capacity()
    models = function_models(curves, real_data["functions"])
    wl = fitted_workload(real.arrivals, real.reference_s(), models, grid)
    settings, recorded = cfg.get("sidecar_settings") or {}, cfg.get("sidecar_boxes")
    boxes = {
        m: node_box(settings.get(m, {}), (recorded or {}).get(m))
        for m in dict.fromkeys([*managers, *real_data["results"]])
    }
    sim = simulate(wl, managers, grid, host_config(*host), model, list(models), boxes)
    order = [m for m in cfg.get("order", [[]])[0] if m in real_data["results"]]
    order += [m for m in real_data["results"] if m not in order]  # the run's order, fixed first
    results = compare(sim, {m: real.block(m) for m in order})
    for m, row in results.items():
        row["not_simulated"] = boxes[m][2]
    errors = [
        row["abs_error_gmean_rfet"]
        for m, row in results.items()
        if m != "fixed" and row["abs_error_gmean_rfet"] is not None
    ]
    noise = real_data.get("noise")
    return {
        "config": {
            "slice": {k: cfg[k] for k in ("minutes", "speedup", "seed")},
            "invocations": len(real.arrivals),
            "seed": cfg["seed"],
            "repeats": cfg["repeats"],
            "grid": cfg["grid"],
            "model": str(model) if model else None,
            "boxes_recorded": recorded is not None,
            "cores_per_mb": cfg.get("cores_per_mb"),
            "host": {"cores": host[0], "mem_mb": host[1]},
            "curves": {k: curves.get(k) for k in ("cpus", "period_us", "load_avg")},
        },
        "functions": {
            n: {**asdict(m), "invocations": int((wl.fn == i).sum())}
            for i, (n, m) in enumerate(models.items())
        },
        "noise": None
        if not noise
        else {k: noise[k] for k in ("gmean_rfet", "gmean_rfet_ci", "slowdown_frac_1_2")},
        "mean_abs_error_gmean_rfet": float(np.mean(errors)) if errors else None,
        "results": results,
    }


# ---------------------------------------------------------------------------------- output
def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _ci(block: dict | None, key: str, fmt: str = "{:.3f}") -> str:
    if block is None:
        return "missing"
    lo, hi = block[key + "_ci"]
    return f"{fmt.format(block[key])} [{fmt.format(lo)}, {fmt.format(hi)}]"


def _get(block: dict | None, key: str) -> float | None:
    return None if block is None else block[key]


def table(rep: dict) -> str:
    """Per manager the simulated and real figures side by side, then per function the
    geometric-mean RFET of both (sim / real)."""
    head = [
        "manager", "gmean RFET sim", "real [95%]", "|error|", ">1.2 sim", "real [95%]",
        "harvested sim", "real", "accel. sim", "real", "OOM sim", "real",
    ]  # fmt: skip
    rows = [head]
    for m, row in rep["results"].items():
        s, r = row["sim"], row["real"]
        rows.append(
            [
                m,
                "missing" if s is None else f"{s['gmean_rfet']:.3f}",
                _ci(r, "gmean_rfet"),
                _f(row["abs_error_gmean_rfet"]),
                "missing" if s is None else f"{s['slowdown_frac_1_2']:.1%}",
                _ci(r, "slowdown_frac_1_2", "{:.1%}"),
                _f(_get(s, "harvested_frac"), "{:.0%}"),
                _f(_get(r, "harvested_frac"), "{:.0%}"),
                _f(_get(s, "accelerated_frac"), "{:.0%}"),
                _f(_get(r, "accelerated_frac"), "{:.0%}"),
                _f(_get(s, "failures"), "{:d}"),
                _f(_get(r, "oom_kills"), "{:d}"),
            ]
        )
    both = [m for m, row in rep["results"].items() if row.get("by_function")]
    fns = sorted({f for m in both for f in rep["results"][m]["by_function"]})
    by = [["function", *both]]
    for f in fns:
        line = [f]
        for m in both:
            e = rep["results"][m]["by_function"].get(f)
            line.append("-" if e is None else f"{e['sim']:.2f} / {e['real']:.2f}")
        by.append(line)
    c = rep["config"]
    sl = c["slice"]
    mae = rep["mean_abs_error_gmean_rfet"]
    noise = rep["noise"]
    load, cpus = c["curves"].get("load_avg"), c["curves"].get("cpus")
    warnings = (
        f"\n\nwarning: bench curves ran at a load average of up to {max(load):.1f} on {cpus} "
        "cores: the fitted functions describe that load more than themselves; measure the "
        "curves on a quiet host"
        if load and cpus and max(load) > BUSY_LOAD * cpus
        else ""
    )
    if not c.get("boxes_recorded", True):
        warnings += (
            "\n\nwarning: the real run predates recorded sidecar boxes (bench real's "
            "config.sidecar_boxes): its sidecars are simulated under today's defaults, which may "
            "not be those they ran with"
        )
    for m, row in rep["results"].items():
        if row.get("not_simulated"):
            warnings += (
                f"\n\nwarning: {m} ran with settings the simulator does not model "
                f"({', '.join(row['not_simulated'])}): its simulated side ran without them"
            )
    return (
        f"slice: {sl['minutes']:g} min at {sl['speedup']:g}x, seed {sl['seed']}, "
        f"{c['invocations']} invocations; real: {c['repeats']} round(s)\n"
        + _text(rows)
        + "\n\ngeometric-mean RFET by function, sim / real:\n"
        + _text(by)
        + f"\n\nmean |error| of the geometric-mean RFET (managers but fixed): {_f(mae)}"
        + (
            ""
            if noise is None
            else f"; the real noise row: {_ci(noise, 'gmean_rfet')}, "
            f"{noise['slowdown_frac_1_2']:.1%} above 1.2"
        )
        + warnings
    )


def _text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


# ---------------------------------------------------------------------------------- command
def _measured(path: str | None, out: Path, produce) -> dict:
    """``path``'s JSON, or the one ``produce(out)`` writes (a non-zero exit code: SystemExit)."""
    if path:
        return json.loads(Path(path).read_text())
    code = produce(out)
    if code:
        raise SystemExit(code)
    return json.loads(out.read_text())


def _cli_args(*argv: str) -> argparse.Namespace:
    """A command's arguments as its own parser makes them: every flag and default, no copy."""
    from sidecar.cli import build_parser

    return build_parser().parse_args(list(argv))


def main(args: argparse.Namespace) -> int:
    from training.invoker import curves as curves_cmd
    from training.invoker import real as real_cmd

    managers = args.managers or (None if args.real else MANAGERS)
    names = [m.strip() for m in (managers or "").split(",") if m.strip()] or None
    with tempfile.TemporaryDirectory(prefix="faasrm-agreement-") as tmp:
        # the measured inputs go beside --json (they took minutes), else to a temporary folder
        stem = str(Path(args.json).with_suffix("")) if args.json else f"{tmp}/agreement"
        curves = _measured(
            args.curves,
            Path(stem + ".curves.json"),
            lambda out: curves_cmd.main(_cli_args("bench", "curves", "--json", str(out))),
        )
        real_argv = [
            "bench", "real", "--managers", ",".join(names or []), "--repeats", str(args.repeats),
            "--minutes", repr(args.minutes), "--speedup", repr(args.speedup),
            "--seed", str(args.seed), "--cores-per-mb", repr(args.cores_per_mb), "--records",
            *(["--model", str(args.model)] if args.model else []),
        ]  # fmt: skip
        real = _measured(
            args.real,
            Path(stem + ".real.json"),
            lambda out: real_cmd.main(_cli_args(*real_argv, "--json", str(out))),
        )
    rep = agreement(real, curves, names, args.model)
    print()
    print(table(rep))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1, sort_keys=True))
        print(f"wrote {args.json}")
    return 0
