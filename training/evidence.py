"""Figures that separate signal from noise: paired bootstrap statistics of resource managers.

Real replays (``faasrm bench real --repeats R``) run every manager over the same N invocations
in each of R rounds, in an order that changes from round to round (``round_order``). An invocation's
reference time is the geometric mean of its Fixed executions (``reference_times``); RFET =
execution time / reference. The **noise** row is Fixed measured the same way: each Fixed round
after the first against the geometric mean of the rounds before it (needs R >= 2). A run is
never compared with itself; the row is slightly wider than a manager's own noise would be (a
manager's reference averages R Fixed runs, round r's only r - 1), so "within the noise" errs on
the side of the noise. The noise row only covers a slot of the host that Fixed ran in: a slow
spell during another manager's run, or a manager whose own decisions diverge between runs, is
not in it. So every manager's rounds are also measured against each other the same way
(``rounds_gmean_ratio``, ``rounds_agree``), and a pair whose managers' rounds disagree is marked
(``rounds_agree`` False): its interval covers which invocations were drawn, not that.

Simulated runs (``faasrm sim eval --seeds``) have an exact counterfactual (the same invocation at
the user's size under the same load), so RFET needs no reference run; figures are pooled over
the seeds.

Every interval is a 95% percentile interval of a paired bootstrap: one set of resampled
invocation indices (``RESAMPLES`` draws, fixed ``SEED``) is applied to every manager, round and
the noise row alike, so differences between them keep their pairing. For several seeds the
bootstrap first draws seeds with replacement, then invocations within each drawn seed. A
resample is represented by how often it draws each invocation (its weights), which lets one
draw serve every figure; quantiles are the weighted inverted-CDF quantile (numpy's
``method="inverted_cdf"`` when every weight is 1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

RESAMPLES = 1000
SEED = 20261129
SLOWDOWN_RFET = 1.2
DURATION_CLASSES: dict[str, tuple[float, float]] = {
    "lt_0.1s": (0.0, 0.1),
    "0.1_1s": (0.1, 1.0),
    "ge_1s": (1.0, math.inf),
}
"""Classes of an invocation's reference execution time (seconds): [lo, hi)."""
_CHUNK_ELEMENTS = 4_000_000
"""Bootstrap weights are built this many (resample x element) values at a time."""


def round_order(managers: Sequence[str], round_index: int) -> list[str]:
    """The order in which the managers replay in a round, so that a drift on the host (warming
    caches, a noisy neighbour) hits every manager alike: round 2k is the order rotated by k,
    round 2k + 1 the same reversed. Every two rounds give every manager the same mean position
    (a steady drift cancels; a plain rotation would put the last manager last in both of two
    rounds), and 2 x len(managers) rounds put each one in every position equally often."""
    k = (round_index // 2) % len(managers) if managers else 0
    order = [*managers[k:], *managers[:k]]
    return order[::-1] if round_index % 2 else order


def duration_class(ref_s: float) -> str | None:
    for name, (lo, hi) in DURATION_CLASSES.items():
        if lo <= ref_s < hi:
            return name
    return None


def verdict(ci: Sequence[float], one: float = 1.0) -> str:
    """``faster`` / ``slower`` when the interval of a geometric-mean RFET lies wholly below /
    above 1, else ``indistinguishable``."""
    lo, hi = ci
    if hi < one:
        return "faster"
    if lo > one:
        return "slower"
    return "indistinguishable"


def _side(ci: Sequence[float], below: str, above: str) -> str:
    lo, hi = ci
    return below if hi < 0 else above if lo > 0 else "within"


# ----------------------------------------------------------------------------------- bootstrap
class Bootstrap:
    """Resampling weights over invocations, drawn once, shared by every figure (paired).

    ``groups`` are the sizes of independent groups of invocations (seeds); one group for a real
    replay. A resample draws ``len(groups)`` groups with replacement, then, within each drawn
    group, as many invocations as it has, with replacement.
    """

    def __init__(self, groups: Sequence[int], resamples: int = RESAMPLES, seed: int = SEED) -> None:
        self.sizes = [int(n) for n in groups]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.units = int(self.offsets[-1])
        self.resamples = resamples
        self.seed = seed

    def chunks(self, elements: int) -> Sequence[np.ndarray]:
        """Unit weights of every resample, ``(C, units)`` float64 blocks; the first block is the
        point estimate (every weight 1), the rest are the resamples in order."""
        out = [np.ones((1, self.units))]
        rng = np.random.default_rng(self.seed)
        per = max(1, _CHUNK_ELEMENTS // max(1, elements))
        g = len(self.sizes)
        left = self.resamples
        while left > 0:
            c = min(per, left)
            w = np.zeros((c, self.units))
            for b in range(c):
                for s in rng.integers(0, g, g) if g > 1 else (0,):
                    n, off = self.sizes[s], self.offsets[s]
                    w[b, off : off + n] += np.bincount(rng.integers(0, n, n), minlength=n)
            out.append(w)
            left -= c
        return out

    def run(
        self, statistic: Callable[[np.ndarray], np.ndarray], elements: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``statistic`` maps unit weights ``(C, units)`` to figures ``(C, k)``; returns the point
        figures ``(k,)`` and the resampled ones ``(resamples, k)``."""
        blocks = [statistic(w) for w in self.chunks(elements)]
        return blocks[0][0], np.concatenate(blocks[1:]) if len(blocks) > 1 else blocks[0][:0]


def interval(values: np.ndarray) -> list[float]:
    """The 95% percentile interval of resampled figures (NaN-free resamples only)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return [math.nan, math.nan]
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(lo), float(hi)]


class Pool:
    """Elements (one invocation in one round) with the unit (invocation) each belongs to; every
    figure is a weighted statistic over elements, the weight being its unit's."""

    def __init__(self, unit: np.ndarray) -> None:
        self.unit = np.asarray(unit, dtype=np.int64)

    def _w(self, w: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return w[:, self.unit[valid]]

    def mean(self, x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        valid = np.isfinite(x)
        xv = x[valid]

        def f(w: np.ndarray) -> np.ndarray:
            ww = self._w(w, valid)
            with np.errstate(invalid="ignore", divide="ignore"):
                return (ww @ xv) / ww.sum(axis=1)

        return f

    def ratio(self, num: np.ndarray, den: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """Weighted sum of ``num`` over weighted sum of ``den`` (elements where both are finite)."""
        valid = np.isfinite(num) & np.isfinite(den)
        nv, dv = num[valid], den[valid]

        def f(w: np.ndarray) -> np.ndarray:
            ww = self._w(w, valid)
            with np.errstate(invalid="ignore", divide="ignore"):
                return (ww @ nv) / (ww @ dv)

        return f

    def quantile(self, x: np.ndarray, q: float) -> Callable[[np.ndarray], np.ndarray]:
        valid = np.isfinite(x)
        order = np.argsort(x[valid], kind="stable")
        xs = x[valid][order]
        units = self.unit[valid][order]

        def f(w: np.ndarray) -> np.ndarray:
            if xs.size == 0:
                return np.full(len(w), math.nan)
            cw = np.cumsum(w[:, units], axis=1)
            total = cw[:, -1]
            k = (cw < q * total[:, None]).sum(axis=1)  # first element whose CDF reaches q
            out = xs[np.minimum(k, xs.size - 1)]
            return np.where(total > 0, out, math.nan)

        return f


class Figures:
    """Named figures computed together on one bootstrap (so all of them are paired)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.fns: list[Callable[[np.ndarray], np.ndarray]] = []

    def add(self, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.names.append(name)
        self.fns.append(fn)

    def run(self, boot: Bootstrap, elements: int) -> dict[str, tuple[float, np.ndarray]]:
        def statistic(w: np.ndarray) -> np.ndarray:
            return np.stack([fn(w) for fn in self.fns], axis=1)

        point, res = boot.run(statistic, elements)
        return {n: (float(point[j]), res[:, j]) for j, n in enumerate(self.names)}


# ----------------------------------------------------------------------------------- real runs
@dataclass(frozen=True)
class Replays:
    """One manager's R replays of the same N invocations: row = round, column = invocation.

    ``exec_s`` is the execution time (for a failed invocation: until it failed), ``core_s``
    and ``mb_s`` the core- and MB-seconds it held over it (the allocation in effect at each
    moment x how long, give-backs included; the user's size x ``exec_s`` under Fixed)."""

    exec_s: np.ndarray
    response_s: np.ndarray
    core_s: np.ndarray
    mb_s: np.ndarray
    failed: np.ndarray
    oom_kills: int = 0

    @property
    def rounds(self) -> int:
        return int(self.exec_s.shape[0])

    def ok_exec(self) -> np.ndarray:
        """Execution times of successful runs, NaN elsewhere."""
        return np.where(self.failed, math.nan, self.exec_s)


def reference_times(fixed: Replays) -> np.ndarray:
    """Each invocation's reference: the geometric mean of its successful Fixed executions."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a call Fixed never ran through: NaN
        return np.exp(np.nanmean(np.log(fixed.ok_exec()), axis=0))


def _later_vs_earlier(runs: Replays) -> tuple[Replays, np.ndarray]:
    """Every round after the first against the geometric mean of the rounds before it (round 2
    against round 1 when R = 2). Fixed's is the noise row; any manager's says whether its rounds
    agree. Later-against-earlier keeps a drift of the host over time in the figure instead of
    cancelling it out."""
    later = Replays(
        runs.exec_s[1:],
        runs.response_s[1:],
        runs.core_s[1:],
        runs.mb_s[1:],
        runs.failed[1:],
    )
    logs = np.log(runs.ok_exec())
    refs = []
    for r in range(1, runs.rounds):
        ok = np.isfinite(logs[:r])
        n = ok.sum(axis=0)  # an invocation failed in every earlier round has no reference
        mean = np.where(ok, logs[:r], 0.0).sum(axis=0) / np.maximum(n, 1)
        refs.append(np.where(n > 0, np.exp(mean), math.nan))
    return later, np.stack(refs)


def _real_figures(
    figs: Figures,
    prefix: str,
    runs: Replays,
    ref: np.ndarray,
    ref_cpu_s: np.ndarray,
    ref_mem_s: np.ndarray,
    ref_resp_s: np.ndarray,
    classes: np.ndarray,
    functions: np.ndarray,
) -> None:
    """Register one row's figures; ``ref`` is (N,) or (R, N); ``ref_*_s`` are Fixed's (N,)."""
    r, n = runs.exec_s.shape
    unit = np.tile(np.arange(n), r)
    pool = Pool(unit)
    ref2 = np.broadcast_to(ref, (r, n))
    ok = runs.ok_exec()
    rfet = (ok / ref2).ravel()
    log_rfet = np.log(rfet)
    valid = np.isfinite(rfet)
    slow = np.where(valid, (rfet > SLOWDOWN_RFET).astype(float), math.nan)
    figs.add(f"{prefix}gmean_rfet", _exp(pool.mean(log_rfet)))
    figs.add(f"{prefix}mean_rfet", pool.mean(rfet))
    figs.add(f"{prefix}p98_rfet", pool.quantile(rfet, 0.98))
    figs.add(f"{prefix}slowdown_frac_1_2", pool.mean(slow))
    figs.add(
        f"{prefix}time_weighted_rfet",
        pool.ratio(np.where(valid, ok.ravel(), math.nan), np.where(valid, ref2.ravel(), math.nan)),
    )
    figs.add(f"{prefix}p98_duration_s", pool.quantile(ok.ravel(), 0.98))
    figs.add(f"{prefix}p98_response_s", pool.quantile(runs.response_s.ravel(), 0.98))
    figs.add(  # waiting included: where harvesting admits calls sooner, this is where it shows
        f"{prefix}response_ratio", pool.ratio(runs.response_s.ravel(), np.tile(ref_resp_s, r))
    )
    figs.add(f"{prefix}alloc_cpu_ratio", pool.ratio(runs.core_s.ravel(), np.tile(ref_cpu_s, r)))
    figs.add(f"{prefix}alloc_mem_ratio", pool.ratio(runs.mb_s.ravel(), np.tile(ref_mem_s, r)))
    for label, keys in (("by_duration", classes), ("by_function", functions)):
        flat = np.tile(keys, r)
        for key in sorted(set(keys.tolist()) - {""}):
            sel = flat == key
            sub = f"{prefix}{label}/{key}/"
            figs.add(f"{sub}gmean_rfet", _exp(pool.mean(np.where(sel, log_rfet, math.nan))))
            figs.add(f"{sub}slowdown_frac_1_2", pool.mean(np.where(sel, slow, math.nan)))


def _exp(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda w: np.exp(f(w))


def _row(
    got: dict[str, tuple[float, np.ndarray]],
    prefix: str,
    runs: Replays,
    ref: np.ndarray,
    classes: np.ndarray,
    functions: np.ndarray,
) -> dict:
    """One STATS block from the computed figures."""
    r, _ = runs.exec_s.shape
    rfet_ok = np.isfinite(runs.ok_exec() / np.broadcast_to(ref, runs.exec_s.shape))

    def fig(name: str, ci: bool = True) -> dict:
        point, res = got[prefix + name]
        out = {name: point}
        if ci:
            out[name + "_ci"] = interval(res)
        return out

    row: dict = {"invocations": int(rfet_ok.sum())}
    for name in (
        "gmean_rfet",
        "mean_rfet",
        "p98_rfet",
        "slowdown_frac_1_2",
        "time_weighted_rfet",
        "p98_duration_s",
        "p98_response_s",
        "response_ratio",
        "alloc_cpu_ratio",
        "alloc_mem_ratio",
    ):
        row.update(fig(name))
    row["failures"] = int(runs.failed.sum())
    row["oom_kills"] = int(runs.oom_kills)
    row["verdict"] = verdict(row["gmean_rfet_ci"])
    for label, keys in (("by_duration", classes), ("by_function", functions)):
        flat = np.tile(keys, r)
        block = {}
        names = list(DURATION_CLASSES) if label == "by_duration" else sorted(set(keys.tolist()))
        for key in names:
            if f"{prefix}{label}/{key}/gmean_rfet" not in got:
                block[key] = {"invocations": 0}
                continue
            sub = f"{label}/{key}/"
            g = fig(sub + "gmean_rfet")
            s = fig(sub + "slowdown_frac_1_2")
            block[key] = {
                "invocations": int((rfet_ok.ravel() & (flat == key)).sum()),
                "gmean_rfet": g[sub + "gmean_rfet"],
                "gmean_rfet_ci": g[sub + "gmean_rfet_ci"],
                "slowdown_frac_1_2": s[sub + "slowdown_frac_1_2"],
                "slowdown_frac_1_2_ci": s[sub + "slowdown_frac_1_2_ci"],
                "verdict": verdict(g[sub + "gmean_rfet_ci"]),
            }
        row[label] = block
    return row


def real_report(
    results: dict[str, Replays],
    functions: Sequence[str],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict:
    """``{"noise": STATS | None, "results": {manager: STATS}, "pairs": {...}}`` for managers that
    replayed the same invocations (``functions[i]`` names invocation i's function); ``fixed``
    must be among them. ``noise`` is None with a single round."""
    fixed = results["fixed"]
    ref = reference_times(fixed)
    fn = np.asarray(functions, dtype=object)
    classes = np.array([duration_class(x) or "" if math.isfinite(x) else "" for x in ref])
    # Fixed's resources per invocation: the user's size x its mean execution time over rounds
    ref_cpu_s = np.nanmean(fixed.core_s, axis=0)
    ref_mem_s = np.nanmean(fixed.mb_s, axis=0)
    ref_resp_s = np.nanmean(fixed.response_s, axis=0)
    figs = Figures()
    noise = fixed.rounds >= 2
    if noise:
        later, noise_ref = _later_vs_earlier(fixed)
        _real_figures(
            figs, "noise:", later, noise_ref, ref_cpu_s, ref_mem_s, ref_resp_s, classes, fn
        )
    for name, runs in results.items():
        _real_figures(figs, f"{name}:", runs, ref, ref_cpu_s, ref_mem_s, ref_resp_s, classes, fn)
        if runs.rounds >= 2:  # its own rounds against each other: did they agree?
            own, own_ref = _later_vs_earlier(runs)
            with np.errstate(divide="ignore", invalid="ignore"):
                log_ratio = np.log(own.ok_exec() / own_ref).ravel()
            pool = Pool(np.tile(np.arange(len(ref)), own.rounds))
            figs.add(f"{name}:rounds_gmean_ratio", _exp(pool.mean(log_ratio)))
    elements = sum(r.exec_s.size for r in results.values()) * 2
    got = figs.run(Bootstrap([len(ref)], resamples, seed), elements)
    out: dict = {"noise": None, "results": {}, "pairs": {}}
    if noise:
        out["noise"] = _row(got, "noise:", later, noise_ref, classes, fn)
    for name, runs in results.items():
        row = _row(got, f"{name}:", runs, ref, classes, fn)
        if name == "fixed":
            row["verdict"] = "reference"
        if f"{name}:rounds_gmean_ratio" in got:
            point, res = got[f"{name}:rounds_gmean_ratio"]
            row["rounds_gmean_ratio"], row["rounds_gmean_ratio_ci"] = point, interval(res)
            row["rounds_agree"] = verdict(row["rounds_gmean_ratio_ci"]) == "indistinguishable"
        if noise:
            diff = got[f"{name}:slowdown_frac_1_2"][1] - got["noise:slowdown_frac_1_2"][1]
            row["slowdown_excess_1_2"] = (
                row["slowdown_frac_1_2"] - out["noise"]["slowdown_frac_1_2"]
            )
            row["slowdown_excess_1_2_ci"] = interval(diff)
            row["slowdown_vs_noise"] = _side(row["slowdown_excess_1_2_ci"], "below", "above")
        out["results"][name] = row
    out["pairs"] = _pairs(got, [m for m in results if m != "fixed"])
    for key, pair in out["pairs"].items():  # a difference between unsteady managers is no finding
        pair["rounds_agree"] = all(
            out["results"][m].get("rounds_agree", True) for m in key.split("/")
        )
    return out


def _pairs(got: dict[str, tuple[float, np.ndarray]], managers: list[str]) -> dict:
    """Paired comparisons of geometric-mean RFET: a / b with its interval (same resamples)."""
    out = {}
    for i, a in enumerate(managers):
        for b in managers[i + 1 :]:
            pa, ra = got[f"{a}:gmean_rfet"]
            pb, rb = got[f"{b}:gmean_rfet"]
            ci = interval(ra / rb)
            out[f"{a}/{b}"] = {
                "gmean_rfet_ratio": pa / pb,
                "gmean_rfet_ratio_ci": ci,
                "verdict": {"faster": f"{a} faster", "slower": f"{b} faster"}.get(
                    verdict(ci), "indistinguishable"
                ),
            }
    return out


# ----------------------------------------------------------------------------------- simulator
@dataclass(frozen=True)
class SimRun:
    """One manager on one simulated workload, per invocation. The simulator knows each
    invocation's execution time at the user's size under the same load (``baseline_s``), so
    RFET = ``exec_s / baseline_s`` exactly; ``cpu_cores``/``mem_mb`` are the allocation."""

    exec_s: np.ndarray
    baseline_s: np.ndarray
    response_s: np.ndarray
    failed: np.ndarray
    cpu_cores: np.ndarray
    mem_mb: np.ndarray
    user_cores: np.ndarray
    user_mb: np.ndarray


SIM_FIGURES = (
    "mean_rfet",
    "gmean_rfet",
    "p98_rfet",
    "p98_duration_s",
    "p98_response_s",
    "slowdown_frac_1_2",
    "alloc_cpu_ratio",
    "alloc_mem_ratio",
)


def _sim_figures(figs: Figures, prefix: str, run: SimRun, pool: Pool, classes: np.ndarray) -> None:
    rfet = run.exec_s / run.baseline_s
    slow = np.where(np.isfinite(rfet), (rfet > SLOWDOWN_RFET).astype(float), math.nan)
    figs.add(f"{prefix}mean_rfet", pool.mean(rfet))
    figs.add(f"{prefix}gmean_rfet", _exp(pool.mean(np.log(rfet))))
    figs.add(f"{prefix}p98_rfet", pool.quantile(rfet, 0.98))
    figs.add(f"{prefix}p98_duration_s", pool.quantile(run.exec_s, 0.98))
    figs.add(f"{prefix}p98_response_s", pool.quantile(run.response_s, 0.98))
    figs.add(f"{prefix}slowdown_frac_1_2", pool.mean(slow))
    figs.add(
        f"{prefix}alloc_cpu_ratio",
        pool.ratio(run.cpu_cores * run.exec_s, run.user_cores * run.baseline_s),
    )
    figs.add(
        f"{prefix}alloc_mem_ratio",
        pool.ratio(run.mem_mb * run.exec_s, run.user_mb * run.baseline_s),
    )
    for key in DURATION_CLASSES:
        sel = classes == key
        figs.add(f"{prefix}by_duration/{key}/mean_rfet", pool.mean(np.where(sel, rfet, math.nan)))
        figs.add(
            f"{prefix}by_duration/{key}/slowdown_frac_1_2", pool.mean(np.where(sel, slow, math.nan))
        )


@dataclass(frozen=True)
class _Choices:
    options: np.ndarray
    differs: dict[str, np.ndarray]


def _cat_choices(logs: Sequence[ChoiceLog]) -> ChoiceLog:
    names = list(logs[0].differs)
    return _Choices(
        np.concatenate([x.options for x in logs]),
        {n: np.concatenate([x.differs[n] for x in logs]) for n in names},
    )


def _cat(runs: Sequence[SimRun]) -> SimRun:
    return SimRun(
        *(np.concatenate([getattr(r, f) for r in runs]) for f in SimRun.__dataclass_fields__)
    )


class ChoiceLog(Protocol):
    """Per invocation of one run: allowed candidates, and whether the choice differs from each
    named rule's in the same state (``training.baselines.Choices``)."""

    options: np.ndarray
    differs: dict[str, np.ndarray]


def _choice_figures(
    figs: Figures,
    prefix: str,
    run: SimRun,
    log: ChoiceLog,
    rules: dict[str, SimRun],
    pool: Pool,
) -> None:
    """How often ``run``'s policy had a choice and chose unlike each rule, and, on those
    invocations, its mean RFET and MB-seconds against the rule's own run of them (paired)."""
    nan = math.nan
    figs.add(f"{prefix}choices/with_choice", pool.mean((log.options > 1).astype(float)))
    rfet = run.exec_s / run.baseline_s
    for name, differs in log.differs.items():
        figs.add(f"{prefix}choices/{name}/differs", pool.mean(differs.astype(float)))
        other = rules.get(name)
        if other is None:
            continue
        d = np.where(differs, rfet - other.exec_s / other.baseline_s, nan)
        figs.add(f"{prefix}choices/{name}/mean_rfet_diff", pool.mean(d))
        mb_s = np.where(differs, run.mem_mb * run.exec_s, nan)
        other_mb_s = np.where(differs, other.mem_mb * other.exec_s, nan)
        figs.add(f"{prefix}choices/{name}/mem_held_ratio", pool.ratio(mb_s, other_mb_s))


def sim_report(
    runs: dict[str, Sequence[SimRun]],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    choices: dict[str, Sequence[ChoiceLog]] | None = None,
) -> dict:
    """Pooled figures per manager over several seeds (``runs[manager][k]`` = seed k's run; every
    manager ran the same workloads), each with its interval from the bootstrap over seeds and
    invocations, and ``vs``: the paired difference of its mean RFET from every other manager's.
    ``choices[manager][k]``: seed k's ``ChoiceLog`` of a learned manager, reported under
    ``choices`` (against each rule's own run when that rule ran too)."""
    managers = list(runs)
    sizes = [len(r.exec_s) for r in next(iter(runs.values()))]
    pool = Pool(np.arange(sum(sizes)))
    # classes by the invocation's duration at the user's size under Fixed: its baseline there.
    # Another manager's baseline carries the load its own choices made (it would class the same
    # invocation otherwise, by the order of the managers); without Fixed, the first manager's.
    base = _cat(runs["fixed" if "fixed" in runs else managers[0]]).baseline_s
    classes = np.array([duration_class(x) or "" for x in base])
    figs = Figures()
    pooled = {m: _cat(rs) for m, rs in runs.items()}
    for m, run in pooled.items():
        _sim_figures(figs, f"{m}:", run, pool, classes)
    logs = {m: _cat_choices(ls) for m, ls in (choices or {}).items()}
    for m, log in logs.items():
        _choice_figures(figs, f"{m}:", pooled[m], log, pooled, pool)
    got = figs.run(Bootstrap(sizes, resamples, seed), len(base))
    out: dict = {}
    for m, run in pooled.items():
        row: dict = {"invocations": int(len(run.exec_s))}
        for name in SIM_FIGURES:
            point, res = got[f"{m}:{name}"]
            row[name] = point
            row[name + "_ci"] = interval(res)
        row["failures"] = int(run.failed.sum())
        row["failures_per_100k"] = 1e5 * row["failures"] / max(1, row["invocations"])
        row["by_duration"] = {
            key: {
                "invocations": int((classes == key).sum()),
                **{
                    name: got[f"{m}:by_duration/{key}/{name}"][0]
                    for name in ("mean_rfet", "slowdown_frac_1_2")
                },
                "mean_rfet_ci": interval(got[f"{m}:by_duration/{key}/mean_rfet"][1]),
            }
            for key in DURATION_CLASSES
        }
        if m in logs:
            row["choices"] = {
                key[len(f"{m}:choices/") :]: {"value": point, "ci": interval(res)}
                for key, (point, res) in got.items()
                if key.startswith(f"{m}:choices/")
            }
        out[m] = row
    for a in managers:
        out[a]["vs"] = {}
        for b in managers:
            if b == a:
                continue
            ci = interval(got[f"{a}:mean_rfet"][1] - got[f"{b}:mean_rfet"][1])
            out[a]["vs"][b] = {
                "mean_rfet_diff": got[f"{a}:mean_rfet"][0] - got[f"{b}:mean_rfet"][0],
                "mean_rfet_diff_ci": ci,
                "verdict": _side(ci, "lower", "higher").replace("within", "indistinguishable"),
            }
    return out
