"""``faasrm bench bound``: the best any allocation gives a real run's calls, from the curves."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from real_helpers import fake_curves, fake_real

from training.evidence import Replays, real_report
from training.invoker.agreement import RealRun
from training.invoker.bound import allocation_bound, best_speedups

QUOTAS = [0.25, 0.5, 1.0, 2.0]


def _curve(function: str, user_cpu: float, times: list[float]) -> dict:
    return {"function": function, "user_cpu": user_cpu, "quotas": QUOTAS, "cpu_times_s": times}


CURVES = {
    "functions": [
        _curve("pyloop", 0.5, [0.696, 0.329, 0.175, 0.171]),  # under-provisioned, 1 thread
        _curve("html", 1.0, [0.494, 0.218, 0.119, 0.123]),  # fits: more CPU buys nothing
        _curve("zlibmt", 1.0, [0.496, 0.214, 0.107, 0.061]),  # 2 threads
    ]
}


def test_best_speedups_take_the_fastest_quota_the_host_has() -> None:
    two = best_speedups(CURVES, host_cores=2.0)
    assert two["pyloop"] == pytest.approx(0.171 / 0.329)
    assert two["html"] == 1.0  # its user's quota is its fastest
    assert two["zlibmt"] == pytest.approx(0.061 / 0.107)
    one = best_speedups(CURVES, host_cores=1.0)  # 2 cores are not on a 1-core host
    assert one["pyloop"] == pytest.approx(0.175 / 0.329)
    assert one["zlibmt"] == 1.0
    # a user's size beyond the host keeps its own time as the reference
    assert best_speedups({"functions": [CURVES["functions"][2]]}, host_cores=0.5)["zlibmt"] == 1.0
    with pytest.raises(ValueError, match="no time measured at its user's 0.75 cores"):
        best_speedups({"functions": [_curve("x", 0.75, [1.0, 1.0, 1.0, 1.0])]}, 2.0)


def _fixed(exec_s: list[float], failed: tuple[int, ...] = ()) -> Replays:
    """One Fixed round of the calls, ``failed`` naming those that did not succeed."""
    x = np.array([exec_s])
    return Replays(x, x, np.ones_like(x), np.ones_like(x), np.isin(np.arange(x.size), failed)[None])


def test_the_bound_speeds_each_fixed_call_up_by_its_function() -> None:
    best = {"pyloop": 0.5, "html": 1.0, "zlibmt": 0.25}
    functions = ["pyloop", "pyloop", "html", "html", "zlibmt", "pyloop"]
    # one round; the last call failed, so it has no reference
    out = allocation_bound(_fixed([0.5, 1.6, 0.05, 0.2, 0.08, 9.0], failed=[5]), functions, best)
    assert out["invocations"] == 5
    by = out["by_duration"]
    assert by["lt_0.1s"] == {"gmean_rfet_bound": pytest.approx(0.5), "invocations": 2}
    assert by["0.1_1s"] == {"gmean_rfet_bound": pytest.approx(math.sqrt(0.5)), "invocations": 2}
    assert by["ge_1s"] == {"gmean_rfet_bound": pytest.approx(0.5), "invocations": 1}
    assert out["gmean_rfet_bound"] == pytest.approx((0.5 * 0.5 * 1 * 1 * 0.25) ** 0.2)
    # bench real's p98 (the inverted CDF): of the five, the fifth (1.6 s); of the sped-up five
    # (pyloop's two calls halved, zlibmt's quartered) 0.8 s
    assert out["p98_exec_s"] == pytest.approx(1.6)
    assert out["p98_exec_s_bound"] == pytest.approx(0.8)
    assert out["p98_exec_ratio_bound"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no curve for 'graph'"):
        allocation_bound(_fixed([0.3]), ["graph"], best)
    with pytest.raises(ValueError, match="no call that Fixed ran through"):
        allocation_bound(_fixed([0.3], failed=[0]), ["html"], best)
    # a class no call falls in has no bound
    assert allocation_bound(_fixed([0.3]), ["html"], best)["by_duration"]["ge_1s"] == {
        "gmean_rfet_bound": None,
        "invocations": 0,
    }


def _bound(tmp_path: Path, real: dict, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "real.json").write_text(json.dumps(real))
    (tmp_path / "curves.json").write_text(json.dumps(fake_curves()))
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "bench", "bound"]
        + ["--real", str(tmp_path / "real.json"), "--curves", str(tmp_path / "curves.json")]
        + list(extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bench_bound_classes_each_call_by_bench_reals_reference(tmp_path) -> None:
    """Two Fixed rounds: a call's reference is the geometric mean of its two times, so a call
    one round ran in 0.08 s and the other in 0.15 s (0.11 s) is in the 0.1-1 s class, as bench
    real has it, and counted once per run, while the p98 pools both rounds' runs; ``rule``'s
    records are no reference."""
    real = fake_real(managers=("fixed", "rule"))
    first = real["records"]["fixed"][0]
    second = [{**r, "exec_s": r["exec_s"] * 1.25} for r in first]
    real["records"]["fixed"].append(second)
    first[0]["exec_s"], second[0]["exec_s"] = 0.08, 0.15
    done = _bound(tmp_path, real, "--host-cores", "2", "--json", str(tmp_path / "b.json"))
    assert done.returncode == 0, done.stderr
    assert "0.1_1s" in done.stdout and "p98 execution time" in done.stdout
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["invocations"] == 2 * len(first) and out["host_cores"] == 2.0
    best = best_speedups(fake_curves(), 2.0)
    assert out["best_speedup"] == pytest.approx(best)
    refs = [math.sqrt(a["exec_s"] * b["exec_s"]) for a, b in zip(first, second, strict=True)]
    assert refs[0] == pytest.approx(0.1095, abs=1e-4)
    short = [i for i, r in enumerate(refs) if r < 0.1]
    assert out["by_duration"]["lt_0.1s"]["invocations"] == 2 * len(short)
    middle = [math.log(best[first[i]["function"]]) for i, r in enumerate(refs) if 0.1 <= r < 1]
    assert out["by_duration"]["0.1_1s"]["invocations"] == 2 * len(middle)
    assert out["by_duration"]["0.1_1s"]["gmean_rfet_bound"] == pytest.approx(
        math.exp(sum(middle) / len(middle))
    )
    # Fixed's p98 is the one bench real reports for the same runs
    run = RealRun.of(real)
    rep = real_report({"fixed": run.fixed()}, [a.container for a in run.arrivals])
    assert out["p98_exec_s"] == rep["results"]["fixed"]["p98_duration_s"]
    # a run without --records is refused with a clear message, and writes nothing
    bare = {k: v for k, v in real.items() if k != "records"}
    done = _bound(tmp_path, bare, "--json", str(tmp_path / "none.json"))
    assert done.returncode == 2 and "--records" in done.stderr
    assert not (tmp_path / "none.json").exists()
    # nor is a file that is not bench curves' output (here, the bound's own)
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "bench", "bound", "--real", str(tmp_path / "real.json")]
        + ["--curves", str(tmp_path / "b.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "is not a 'faasrm bench curves --json' output" in done.stderr
