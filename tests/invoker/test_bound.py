"""``faasrm bench bound``: the best any allocation gives a real run's calls, from the curves."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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


def _call(function: str, exec_s: float, outcome: str = "success") -> dict:
    return {"function": function, "exec_s": exec_s, "outcome": outcome}


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


def test_the_bound_speeds_each_fixed_call_up_by_its_function() -> None:
    best = {"pyloop": 0.5, "html": 1.0, "zlibmt": 0.25}
    calls = [
        _call("pyloop", 0.5),
        _call("pyloop", 1.6),
        _call("html", 0.05),
        _call("html", 0.2),
        _call("zlibmt", 0.08),
        _call("pyloop", 9.0, outcome="failure"),  # not a reference
    ]
    out = allocation_bound(calls, best)
    assert out["invocations"] == 5
    by = out["by_duration"]
    assert by["lt_0.1s"] == {"gmean_rfet_bound": pytest.approx(0.5), "invocations": 2}
    assert by["0.1_1s"] == {"gmean_rfet_bound": pytest.approx(math.sqrt(0.5)), "invocations": 2}
    assert by["ge_1s"] == {"gmean_rfet_bound": pytest.approx(0.5), "invocations": 1}
    assert out["gmean_rfet_bound"] == pytest.approx((0.5 * 0.5 * 1 * 1 * 0.25) ** 0.2)
    # numpy's p98 of the five: 0.5 + 0.92 x (1.6 - 0.5), and of the sped-up five (pyloop's two
    # calls halved, zlibmt's quartered) 0.25 + 0.92 x (0.8 - 0.25)
    assert out["p98_exec_s"] == pytest.approx(1.512)
    assert out["p98_exec_s_bound"] == pytest.approx(0.756)
    assert out["p98_exec_ratio_bound"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no curve for 'graph'"):
        allocation_bound([_call("graph", 0.3)], best)
    with pytest.raises(ValueError, match="no successful Fixed call"):
        allocation_bound([_call("html", 0.3, outcome="failure")], best)
    # a class no call falls in has no bound
    assert allocation_bound([_call("html", 0.3)], best)["by_duration"]["ge_1s"] == {
        "gmean_rfet_bound": None,
        "invocations": 0,
    }


def _bound(tmp_path: Path, real: dict, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "real.json").write_text(json.dumps(real))
    (tmp_path / "curves.json").write_text(json.dumps(CURVES))
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "bench", "bound"]
        + ["--real", str(tmp_path / "real.json"), "--curves", str(tmp_path / "curves.json")]
        + list(extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bench_bound_reads_a_real_runs_fixed_records_and_writes_the_figures(tmp_path) -> None:
    rounds = [[_call("pyloop", 0.4), _call("html", 0.2)], [_call("pyloop", 0.5)]]
    other = [[_call("pyloop", 0.01)]]  # a manager's records are not the reference
    real = {"records": {"fixed": rounds, "smallest": other}}
    done = _bound(tmp_path, real, "--host-cores", "2", "--json", str(tmp_path / "b.json"))
    assert done.returncode == 0, done.stderr
    assert "0.1_1s" in done.stdout and "p98 execution time" in done.stdout
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["invocations"] == 3 and out["host_cores"] == 2.0
    assert out["best_speedup"]["pyloop"] == pytest.approx(0.171 / 0.329)
    g = out["by_duration"]["0.1_1s"]["gmean_rfet_bound"]
    assert g == pytest.approx((0.171 / 0.329) ** (2 / 3))
    # a run without --records is refused with a clear message, and writes nothing
    done = _bound(tmp_path, {"results": {}}, "--json", str(tmp_path / "none.json"))
    assert done.returncode == 2 and "--records" in done.stderr
    assert not (tmp_path / "none.json").exists()
