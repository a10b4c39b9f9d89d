"""Measured duration curves of the real functions, checked against the simulator's model.

For each real function (one fixed mid-size input, ``CURVE_SIZES``), in one real v1 container
(``training.invoker.invoker.Container``: a cgroup holding a long-lived worker):

* CPU curve: the median execution time (``repeats`` runs) at CFS quotas of 0.25 / 0.5 / 1 / 2
  cores (period 100 ms), memory at the user's size;
* memory curve: the container's peak memory use at the user's size (``memory.max_usage_in_bytes``,
  worker included), then the median time at 1.0x / 1.25x / 2x that peak, CPU at the user's
  quota; finally one run with the limit half-way between the idle worker and the peak, which
  should be OOM-killed (recorded; a timeout kills the worker, nothing hangs);
* working set against input: the peak also at the low and high end of the function's input
  range, fitted as the idle worker plus a power law of the input (``fit_working_set``), which is
  what ``faasrm bench agreement`` gives each simulated invocation.

The simulator's CPU model (``training/sim/cluster.py``, no contention, memory ample) is then
fitted to each CPU curve by least squares on relative error over phi in [0, 1] and parallelism
p in [0.05, 8]::

    t(c) = t1 * ((1 - phi) + phi * min(1, p) / min(c, p)),   t1 = measured time at 1 core

``faasrm bench curves --json PATH`` prints the table and writes the JSON; docs/duration-model.md
has one run and what it means for the simulator. ``--periods`` measures instead the CPU time at
every CFS period x quota (``measure_periods``: does a per-function period help short bursts?).
Needs root and writable v1 cgroups.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sidecar import cgroups
from sidecar.units import MB
from training.invoker.functions import BY_NAME, DEFAULT_RATIO, SPECS, FunctionSpec

QUOTAS = (0.25, 0.5, 1.0, 2.0)
MEM_FACTORS = (1.0, 1.25, 2.0)
PERIOD_US = 100_000
CURVE_SIZES = {  # ~0.1-0.25 s at one core on this host: the whole run stays near a minute
    "pyloop": 2500,
    "matmul": 900,
    "zlibmt": 3,
    "image": 1100,
    "compress": 2,
    "graph": 25000,
    "html": 30000,
    "memhog": 120,
    "sleepy": 200,
    "phased": 50,
    "spiky": 3,  # an input that does not spike (spiky's peak curve is its usual one)
}


# ----------------------------------------------------------------------------------- the fit


def model(c: np.ndarray | float, t1: float, phi: float, p: float) -> np.ndarray:
    """The simulator's CPU model without contention: time at ``c`` cores."""
    c = np.asarray(c, dtype=float)
    return t1 * ((1.0 - phi) + phi * min(1.0, p) / np.minimum(c, p))


def fit_cpu(quotas, times, t1: float | None = None) -> dict:
    """Least squares (relative residuals) of ``model`` over phi in [0, 1], p in [0.05, 8].

    For a fixed p the model is linear in phi, so phi has a closed form (clipped to [0, 1]);
    p is searched on a fine log grid. ``t1`` defaults to the measured time at 1 core.
    Returns phi, p, t1, the fitted times and the max / RMS relative error.
    """
    c = np.asarray(quotas, dtype=float)
    t = np.asarray(times, dtype=float)
    if t1 is None:
        t1 = float(np.interp(1.0, c, t)) if 1.0 not in c else float(t[c == 1.0][0])
    a = (t1 - t) / t  # relative residual = a + phi * b(p)
    best = (np.inf, 0.0, 1.0)
    for p in np.geomspace(0.05, 8.0, 2000):
        b = t1 * (min(1.0, p) / np.minimum(c, p) - 1.0) / t
        bb = float(b @ b)
        phi = 0.0 if bb == 0 else float(np.clip(-(a @ b) / bb, 0.0, 1.0))
        sse = float(((a + phi * b) ** 2).sum())
        if sse < best[0] - 1e-12:
            best = (sse, phi, float(p))
    _, phi, p = best
    fitted = model(c, t1, phi, p)
    rel = np.abs(fitted - t) / t
    return {
        "phi": phi,
        "p": p,
        "t1_s": t1,
        "fitted_s": [float(x) for x in fitted],
        "max_rel_err": float(rel.max()),
        "rms_rel_err": float(np.sqrt((rel**2).mean())),
    }


WS_FLOOR_MB = 1.0
"""A peak less than this above the idle worker counts as no growth (page and allocator noise)."""


def fit_working_set(sizes, peaks_mb, idle_mb: float, ref_size: float) -> dict:
    """The container's peak memory against the input: ``idle + a * (size / ref_size) ** b``.

    Least squares of log(peak - idle) on log(size) over the points that grow more than
    ``WS_FLOOR_MB`` above the idle worker, ``b`` clipped to [0, 3] (1: memory that grows with the
    input, as memhog; 2: with its square, as an n x n matrix); with fewer than two such points
    the growth is the constant ``a`` = the largest one (b = 0). Returns the parameters, the fitted
    peaks and the largest error in MB.
    """
    s = np.asarray(sizes, dtype=float)
    inc = np.asarray(peaks_mb, dtype=float) - idle_mb
    grows = inc > WS_FLOOR_MB
    if grows.sum() >= 2:
        x, y = np.log(s[grows] / ref_size), np.log(inc[grows])
        b = float(np.clip(np.polyfit(x, y, 1)[0], 0.0, 3.0)) if np.ptp(x) > 0 else 0.0
        a = float(np.exp(np.mean(y - b * x)))
    else:
        a, b = float(max(0.0, inc.max(initial=0.0))), 0.0
    fit = {"idle_mb": float(idle_mb), "a_mb": a, "b": b, "ref_size": float(ref_size)}
    fitted = [working_set_mb(fit, x) for x in s]
    fit["fitted_mb"] = fitted
    fit["max_abs_err_mb"] = float(np.max(np.abs(np.asarray(fitted) - inc - idle_mb)))
    return fit


def working_set_mb(fit: dict, size: float) -> float:
    """The fitted peak memory (MB, idle worker included) of one invocation with input ``size``."""
    return fit["idle_mb"] + fit["a_mb"] * (size / fit["ref_size"]) ** fit["b"]


# ----------------------------------------------------------------------- real measurements


@dataclass
class Curve:
    function: str
    size: float
    user_cpu: float
    user_mem_mb: float
    quotas: list[float] = field(default_factory=list)
    cpu_times_s: list[float] = field(default_factory=list)  # medians, one per quota
    cpu_runs_s: list[list[float]] = field(default_factory=list)
    cpu_work_s: list[float] = field(default_factory=list)  # median CPU seconds a run used (cpuacct)
    throttled: list[int] = field(default_factory=list)  # nr_throttled during the repeats
    idle_mb: float = 0.0
    peak_mb: float = 0.0
    mem_factors: list[float] = field(default_factory=list)
    mem_limits_mb: list[float] = field(default_factory=list)
    mem_times_s: list[float | None] = field(default_factory=list)  # None: not every run succeeded
    mem_outcomes: list[list[str]] = field(default_factory=list)
    below_peak_mb: float | None = None
    below_peak_outcome: str | None = None  # oom / success / failure / timeout / refused
    fit: dict | None = None
    ws_sizes: list[float] = field(default_factory=list)  # inputs: low end, ``size``, high end
    ws_peaks_mb: list[float] = field(default_factory=list)  # the container's peak at each
    ws_fit: dict | None = None  # ``fit_working_set``


def _v1_file(rel: str, controller: str, name: str) -> str:
    return os.path.join(cgroups.DEFAULT_ROOT, controller, rel, name)


def _read_int(rel: str, controller: str, name: str) -> int:
    with open(_v1_file(rel, controller, name)) as f:
        return int(f.read().split()[0])


def _nr_throttled(rel: str) -> int:
    with open(_v1_file(rel, "cpu", "cpu.stat")) as f:
        for line in f:
            if line.startswith("nr_throttled "):
                return int(line.split()[1])
    return 0


async def measure(
    spec: FunctionSpec,
    size: float | None = None,
    *,
    quotas=QUOTAS,
    mem_factors=MEM_FACTORS,
    repeats: int = 3,
    below_peak: bool = True,
    size_range: bool = True,
    ratio: float = DEFAULT_RATIO,
    timeout_s: float = 30.0,
    parent: str | None = None,
) -> Curve:
    """The CPU and memory curves of one function in one fresh container (removed afterwards);
    ``size_range``: also the peak at both ends of its input range, and the working-set fit."""
    from training.invoker.invoker import Container, container_limits, remove_parent

    size = float(CURVE_SIZES[spec.name] if size is None else size)
    parent = parent or f"faasrm-curves-{os.getpid()}"
    c = Container(parent, spec, ratio)
    user_mem = int(spec.mem_mb * MB)
    curve = Curve(spec.name, size, c.user_cpu, spec.mem_mb)

    def set_limits(cpu: float, mem_bytes: int) -> None:
        assert c.cg is not None
        c.cg.write_limits(
            container_limits(cpu, mem_bytes / MB, PERIOD_US), headroom_bytes=0, force=True
        )

    async def peak_bytes(at: float) -> int:
        """The container's high-water mark over 2 runs at input ``at`` (reset first)."""
        with open(_v1_file(c.rel, "memory", "memory.max_usage_in_bytes"), "w") as f:
            f.write("0")
        peaks = []
        for _ in range(2):
            await c.run(at, timeout_s)
            peaks.append(_read_int(c.rel, "memory", "memory.max_usage_in_bytes"))
        return max(peaks)

    try:
        await c.start()
        await c.run(size, timeout_s)  # warm-up, unrecorded
        for q in quotas:
            set_limits(q, user_mem)
            thr0, runs, work = _nr_throttled(c.rel), [], []
            for _ in range(repeats):
                cpu0 = c.cg.read_usage().cpu_usage_s
                exec_s, outcome, err = await c.run(size, timeout_s)
                if outcome != "success":
                    raise RuntimeError(f"{spec.name} at {q} cores: {outcome} {err}")
                runs.append(exec_s)
                work.append(c.cg.read_usage().cpu_usage_s - cpu0)
            curve.quotas.append(q)
            curve.cpu_runs_s.append(runs)
            curve.cpu_times_s.append(statistics.median(runs))
            curve.cpu_work_s.append(statistics.median(work))
            curve.throttled.append(_nr_throttled(c.rel) - thr0)
        if mem_factors or below_peak or size_range:
            set_limits(c.user_cpu, user_mem)
            curve.idle_mb = _read_int(c.rel, "memory", "memory.usage_in_bytes") / MB
            peak = await peak_bytes(size)
            curve.peak_mb = peak / MB
            for k in mem_factors:
                limit = int(peak * k)
                set_limits(c.user_cpu, limit)
                runs, outcomes = [], []
                for _ in range(repeats):
                    exec_s, outcome, _ = await c.run(size, timeout_s)
                    outcomes.append(outcome)
                    if outcome == "success":
                        runs.append(exec_s)
                curve.mem_factors.append(k)
                curve.mem_limits_mb.append(limit / MB)
                curve.mem_outcomes.append(outcomes)
                curve.mem_times_s.append(statistics.median(runs) if len(runs) == repeats else None)
            if size_range:  # after the memory curve: a large input may leave the worker bigger
                set_limits(c.user_cpu, user_mem)
                ends = {spec.lo: 0.0, spec.hi: 0.0}
                for at in ends:
                    ends[at] = await peak_bytes(at) / MB
                points = sorted({**ends, size: curve.peak_mb}.items())
                curve.ws_sizes = [x for x, _ in points]
                curve.ws_peaks_mb = [y for _, y in points]
                curve.ws_fit = fit_working_set(
                    curve.ws_sizes, curve.ws_peaks_mb, curve.idle_mb, size
                )
            if below_peak:  # last: the worker may die here and is not restarted
                set_limits(c.user_cpu, user_mem)
                idle = _read_int(c.rel, "memory", "memory.usage_in_bytes")
                limit = int(idle + 0.5 * max(0, peak - idle))
                curve.below_peak_mb = limit / MB
                try:
                    set_limits(c.user_cpu, limit)
                except cgroups.CgroupError:
                    curve.below_peak_outcome = "refused"
                else:
                    _, curve.below_peak_outcome, _ = await c.run(size, timeout_s, respawn=False)
    finally:
        try:
            await c.stop()
        finally:
            remove_parent(parent)
    if len(curve.quotas) >= 2 and 1.0 in curve.quotas:
        curve.fit = fit_cpu(curve.quotas, curve.cpu_times_s)
    return curve


@dataclass
class PeriodSweep:
    """One function's CPU time at every CFS period x quota (memory at the user's size)."""

    function: str
    size: float
    quotas: list[float]
    periods_us: list[int]
    times_s: list[list[float]] = field(default_factory=list)  # [period][quota] medians
    runs_s: list[list[list[float]]] = field(default_factory=list)
    throttled: list[list[int]] = field(default_factory=list)  # nr_throttled during the runs
    unlimited_s: float = 0.0  # median time without a quota: the burst's own wall time
    cpu_s: float = 0.0  # median CPU time of one run (cpuacct): the burst's work


async def measure_periods(
    spec: FunctionSpec,
    size: float | None = None,
    *,
    periods_us=(50_000, PERIOD_US, 200_000),
    quotas=(0.25, 0.5, 1.0),
    repeats: int = 5,
    ratio: float = DEFAULT_RATIO,
    timeout_s: float = 30.0,
    parent: str | None = None,
) -> PeriodSweep:
    """The median time of ``spec`` at every CFS period x quota, in one fresh container.

    The points are visited in ``repeats`` rounds, each over every (period, quota) and one run
    without a quota, so a drift of a busy host spreads over all points instead of biasing the
    last ones. Each run starts wherever the period happens to be, as a real invocation does.
    """
    from training.invoker.invoker import Container, container_limits, remove_parent

    size = float(CURVE_SIZES[spec.name] if size is None else size)
    parent = parent or f"faasrm-curves-{os.getpid()}"
    c = Container(parent, spec, ratio)
    sweep = PeriodSweep(spec.name, size, list(quotas), list(periods_us))
    runs = {(p, q): [] for p in periods_us for q in quotas}
    throttled = dict.fromkeys(runs, 0)
    free: list[float] = []
    cpu: list[float] = []
    try:
        await c.start()
        assert c.cg is not None
        await c.run(size, timeout_s)  # warm-up, unrecorded
        for _ in range(repeats):
            for point in [*runs, None]:
                p, q = point if point is not None else (PERIOD_US, None)
                limits = container_limits(c.user_cpu, spec.mem_mb, p)
                c.cg.write_limits(
                    dataclasses.replace(limits, cpu_quota_cores=q), headroom_bytes=0, force=True
                )
                thr0, cpu0 = _nr_throttled(c.rel), c.cg.read_usage().cpu_usage_s
                exec_s, outcome, err = await c.run(size, timeout_s)
                if outcome != "success":
                    raise RuntimeError(f"{spec.name} at {q} cores, period {p} us: {outcome} {err}")
                if point is None:
                    free.append(exec_s)
                    cpu.append(c.cg.read_usage().cpu_usage_s - cpu0)
                else:
                    runs[point].append(exec_s)
                    throttled[point] += _nr_throttled(c.rel) - thr0
    finally:
        try:
            await c.stop()
        finally:
            remove_parent(parent)
    for p in periods_us:
        sweep.runs_s.append([runs[p, q] for q in quotas])
        sweep.times_s.append([statistics.median(runs[p, q]) for q in quotas])
        sweep.throttled.append([throttled[p, q] for q in quotas])
    sweep.unlimited_s, sweep.cpu_s = statistics.median(free), statistics.median(cpu)
    return sweep


async def measure_all(
    names: list[str] | None = None, repeats: int = 3, progress=None
) -> list[Curve]:
    out = []
    parent = f"faasrm-curves-{os.getpid()}"
    for spec in [BY_NAME[n] for n in names] if names else SPECS:
        out.append(await measure(spec, repeats=repeats, parent=parent))
        if progress:
            progress(out[-1])
    return out


# ---------------------------------------------------------------------------------- output


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def render_table(curves: list[Curve]) -> str:
    q = curves[0].quotas if curves else list(QUOTAS)
    k = curves[0].mem_factors if curves else list(MEM_FACTORS)
    head = (
        ["function", "size", "user"]
        + [f"{x:g}c ms" for x in q]
        + ["phi", "p", "fit err"]
        + ["peak MB", "lo/hi input pk MB", "ws b"]
        + [f"{x:g}xpk ms" for x in k]
        + ["OOM<peak"]
    )
    rows = []
    for cv in curves:
        f = cv.fit or {}
        oom = {"oom": "yes", None: "-"}.get(cv.below_peak_outcome, f"no ({cv.below_peak_outcome})")
        ends = f"{cv.ws_peaks_mb[0]:.0f}/{cv.ws_peaks_mb[-1]:.0f}" if cv.ws_peaks_mb else "-"
        ws_b = f"{cv.ws_fit['b']:.2f}" if cv.ws_fit else "-"
        rows.append(
            [cv.function, f"{cv.size:g}", f"{cv.user_cpu:g}c/{cv.user_mem_mb:g}M"]
            + [_ms(t) for t in cv.cpu_times_s]
            + [
                f"{f.get('phi', float('nan')):.2f}",
                f"{f.get('p', float('nan')):.2f}",
                f"{100 * f.get('max_rel_err', float('nan')):.0f}%",
            ]
            + [f"{cv.peak_mb:.0f}", ends, ws_b]
            + [
                _ms(t) if t is not None else "/".join(o[:3] for o in outs)
                for t, outs in zip(cv.mem_times_s, cv.mem_outcomes, strict=True)
            ]
            + [oom]
        )
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: list) -> str:
        return "  ".join(
            str(x).rjust(w) if i else str(x).ljust(w)
            for i, (x, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([fmt(head), *(fmt(r) for r in rows)])


def render_periods(sweeps: list[PeriodSweep]) -> str:
    """One row per function x period: median ms at each quota, throttled periods in brackets."""
    lines = []
    for sw in sweeps:
        lines.append(
            f"{sw.function} (input {sw.size:g}): {1000 * sw.cpu_s:.0f} ms of CPU in "
            f"{1000 * sw.unlimited_s:.0f} ms without a quota"
        )
        head = ["period ms"] + [f"{q:g}c ms [thr]" for q in sw.quotas]
        rows = [
            [f"{p / 1000:g}"] + [f"{_ms(t)} [{n}]" for t, n in zip(ts, thr, strict=True)]
            for p, ts, thr in zip(sw.periods_us, sw.times_s, sw.throttled, strict=True)
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines += [
            "  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True)) for r in [head, *rows]
        ]
    return "\n".join(lines)


def to_json(curves: list[Curve], elapsed_s: float, load_avg: list[float]) -> dict:
    """``load_avg``: the host's 1-minute load average before and after: curves measured on a
    busy host describe the other work more than the functions (each gets a share of a core)."""
    return {
        "period_us": PERIOD_US,
        "quotas": list(QUOTAS),
        "mem_factors": list(MEM_FACTORS),
        "elapsed_s": elapsed_s,
        "cpus": os.cpu_count(),
        "load_avg": load_avg,
        "model": "t(c) = t1 * ((1 - phi) + phi * min(1, p) / min(c, p))",
        "working_set_model": "peak(size) = idle_mb + a_mb * (size / ref_size) ** b",
        "functions": [asdict(c) for c in curves],
    }


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise ValueError("bench curves needs root (it creates v1 cgroups)")
    names = [n.strip() for n in (args.functions or "").split(",") if n.strip()] or None
    if args.periods:
        return _main_periods(args, names or ["matmul"])
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    curves = asyncio.run(
        measure_all(
            names, args.repeats, progress=lambda cv: print(f"  {cv.function}: done", flush=True)
        )
    )
    elapsed, load = time.monotonic() - t0, [load0, os.getloadavg()[0]]
    print(render_table(curves))
    print(
        f"({elapsed:.0f} s; CFS period {PERIOD_US // 1000} ms; median of {args.repeats}; "
        "fit err = max relative error of the fitted simulator CPU model; lo/hi input pk = the "
        "peak at both ends of the input range; ws b = exponent of the working set's growth)"
    )
    print(f"load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(to_json(curves, elapsed, load), indent=2))
        print(f"wrote {args.json}")
    return 0


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _main_periods(args: argparse.Namespace, names: list[str]) -> int:
    """``bench curves --periods``: the period sweep of each function (default matmul)."""
    sizes = dict(kv.split("=", 1) for kv in (args.sizes or "").split(",") if kv.strip())
    periods = [round(ms * 1000) for ms in _floats(args.periods)]
    quotas = _floats(args.quotas) if args.quotas else [0.25, 0.5, 1.0]
    t0 = time.monotonic()

    async def sweep_all() -> list[PeriodSweep]:
        out = []
        for name in names:
            size = float(sizes[name]) if name in sizes else None
            out.append(
                await measure_periods(
                    BY_NAME[name], size, periods_us=periods, quotas=quotas, repeats=args.repeats
                )
            )
        return out

    sweeps = asyncio.run(sweep_all())
    elapsed = time.monotonic() - t0
    print(render_periods(sweeps))
    print(
        f"({elapsed:.0f} s; median of {args.repeats} runs per point, visited in rounds; [thr] = "
        f"throttled periods over those runs; load average {os.getloadavg()[0]:.1f})"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        data = {"elapsed_s": elapsed, "cpus": os.cpu_count(), "sweeps": [asdict(x) for x in sweeps]}
        Path(args.json).write_text(json.dumps(data, indent=2))
        print(f"wrote {args.json}")
    return 0
