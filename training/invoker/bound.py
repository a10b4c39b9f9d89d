"""What any re-sizing can gain at most on a real run's calls, from the measured curves.

The simulator has its Oracle for this; real functions have ``faasrm bench curves``: each
function's median time at CFS quotas of 0.25 to 2 cores. More memory than the peak buys no speed
(docs/duration-model.md), so the fastest a call can run on this host is its function's fastest
quota up to the host's cores. ``best_speedups`` takes that over the time at the user's CPU, per
function; ``allocation_bound`` applies it to Fixed's calls of a ``faasrm bench real --records``
run and gives the geometric-mean RFET by duration class (each call classed by its reference
time, the geometric mean of Fixed's rounds, as ``bench real`` classes it) and the p98 execution
time against Fixed's that no manager can beat there, up to the curves' noise (a function
already fast at its user's size has a speed-up of 1, whatever it is given).

``faasrm bench bound --real PATH --curves PATH``: docs/invoker.md, "What the functions allow".
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.evidence import DURATION_CLASSES, Replays, duration_class, reference_times
from training.invoker.agreement import RealRun


def best_speedups(curves: dict[str, Any], host_cores: float) -> dict[str, float]:
    """Per function of a ``bench curves`` JSON: its least measured time at a quota up to
    ``host_cores`` (its user's quota included) over its time at the user's quota, at most 1."""
    out: dict[str, float] = {}
    for c in curves["functions"]:
        times = dict(zip(c["quotas"], c["cpu_times_s"], strict=True))
        at_user = times.get(c["user_cpu"])
        if at_user is None or at_user <= 0.0:
            raise ValueError(
                f"{c['function']}: no time measured at its user's {c['user_cpu']} cores"
            )
        least = min(t for q, t in times.items() if q <= host_cores or q == c["user_cpu"])
        out[c["function"]] = least / at_user
    return out


def allocation_bound(
    fixed: Replays, functions: Sequence[str], best: dict[str, float]
) -> dict[str, Any]:
    """Fixed's rounds of calls to ``functions``, each sped up by its function's ``best``: the
    geometric-mean RFET per duration class over Fixed's successful runs, each classed by its
    call's reference time, and their p98 execution time before and after: as ``bench real``
    classes, counts and pools them."""
    missing = sorted(set(functions) - set(best))
    if missing:
        raise ValueError(f"no curve for {missing[0]!r}: measure it with bench curves")
    speed = np.array([best[f] for f in functions])
    ok = fixed.ok_exec()
    runs = np.isfinite(ok).sum(axis=0)  # each call counts once per successful Fixed run
    if not runs.any():
        raise ValueError("no call that Fixed ran through in the run")
    logs: dict[str, list[float]] = {c: [] for c in DURATION_CLASSES}
    every: list[float] = []
    for r, s, k in zip(reference_times(fixed), speed, runs, strict=True):
        cls = duration_class(float(r)) if k else None
        if cls is not None:
            logs[cls] += [math.log(s)] * k
        every += [math.log(s)] * k
    # bench real's p98 (``evidence.Pool.quantile``: the inverted CDF), so Fixed's is its figure
    p98 = float(np.nanpercentile(ok, 98, method="inverted_cdf"))
    p98_bound = float(np.nanpercentile(ok * speed, 98, method="inverted_cdf"))
    return {
        "by_duration": {
            c: {
                "gmean_rfet_bound": math.exp(sum(v) / len(v)) if v else None,
                "invocations": len(v),
            }
            for c, v in logs.items()
        },
        "gmean_rfet_bound": math.exp(sum(every) / len(every)),
        "p98_exec_s": p98,
        "p98_exec_s_bound": p98_bound,
        "p98_exec_ratio_bound": p98_bound / p98,
        "invocations": len(every),
    }


def table(out: dict[str, Any]) -> str:
    lines = [
        f"the least any allocation gives Fixed's {out['invocations']} runs on "
        f"{out['host_cores']:g} cores (each function's fastest quota in bench curves):",
        f"  all calls: geometric-mean RFET {out['gmean_rfet_bound']:.3f}",
    ]
    for c, b in out["by_duration"].items():
        g = b["gmean_rfet_bound"]
        lines.append(f"  {c}: {'-' if g is None else f'{g:.3f}'} ({b['invocations']} runs)")
    lines.append(
        f"  p98 execution time {out['p98_exec_s_bound']:.2f} s against Fixed's "
        f"{out['p98_exec_s']:.2f} s ({out['p98_exec_ratio_bound']:.3f} of it)"
    )
    per = ", ".join(f"{f} {s:.2f}" for f, s in sorted(out["best_speedup"].items()))
    lines.append(f"  best time over the user's size, per function: {per}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    real = json.loads(Path(args.real).read_text())
    curves = json.loads(Path(args.curves).read_text())
    host = float(args.host_cores or os.cpu_count() or 1)
    if not isinstance(curves, dict) or not isinstance(curves.get("functions"), list):
        raise ValueError(f"{args.curves} is not a 'faasrm bench curves --json' output")
    best = best_speedups(curves, host)
    run = RealRun.of(real)
    functions = [a.container for a in run.arrivals]
    out = {
        **allocation_bound(run.fixed(), functions, best),
        "best_speedup": best,
        "host_cores": host,
    }
    print(table(out))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
