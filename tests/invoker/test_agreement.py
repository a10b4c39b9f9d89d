"""``faasrm bench agreement``: the fitted workload, the side-by-side report on synthetic inputs,
and one end-to-end run on real cgroups."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from real_helpers import HOST, fake_curves, fake_real

from sidecar.core.grid import ResourceGrid
from training.invoker.agreement import (
    COMPARED,
    FunctionModel,
    RealRun,
    agreement,
    fit_cpu_sim,
    fitted_workload,
    simulated_curves,
    table,
)
from training.invoker.curves import QUOTAS, fit_cpu
from training.invoker.functions import SPECS
from training.invoker.real import INVOKER_GRID

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ the fit
@pytest.mark.parametrize("phi,p,user", [(0.9, 1.6, 1.0), (1.0, 1.0, 0.5), (0.5, 1.5, 1.0)])
def test_the_cpu_fit_recovers_the_simulators_own_curve(phi: float, p: float, user: float) -> None:
    times = simulated_curves(QUOTAS, user, 0.3, [(phi, p)], 2.0)[0]
    # the simulator's staircase: slower below the user's quota, never slower above it
    assert times[0] > times[-1] and np.all(np.diff(times) <= 1e-12)
    fit = fit_cpu_sim(QUOTAS, times, user, phi, 2.0)
    assert fit["max_rel_err"] < 0.02, fit
    assert fit["p"] == pytest.approx(p, rel=0.05) and fit["phi"] == phi


def test_the_cpu_fit_sees_the_threads_of_a_burst_the_linear_fit_misses() -> None:
    # matmul on a quiet host (docs/duration-model.md): ~80 ms of CPU on 2 BLAS threads in 48 ms
    times = [0.397, 0.118, 0.048, 0.041]
    linear = fit_cpu(QUOTAS, times)
    fit = fit_cpu_sim(QUOTAS, times, 1.0, linear["phi"], 2.0)
    assert linear["p"] < 1.3 < fit["p"]
    assert fit["max_rel_err"] < 0.25 < linear["max_rel_err"]


def test_a_flat_curve_fits_as_waiting() -> None:
    fit = fit_cpu_sim(QUOTAS, [0.2, 0.2, 0.2, 0.2], 2.0, 0.0, 2.0)
    assert fit["max_rel_err"] < 1e-6


def test_the_fit_refuses_quotas_off_its_grid() -> None:
    with pytest.raises(ValueError, match="0.25"):
        fit_cpu_sim([0.3, 1.0], [0.5, 0.2], 1.0, 1.0, 2.0)


# ------------------------------------------------------------------------- the workload
def _models() -> dict[str, FunctionModel]:
    ws = {"idle_mb": 20.0, "a_mb": 100.0, "b": 1.0, "ref_size": 100.0}
    return {
        "memhog": FunctionModel("memhog", 2.0, 512.0, 1.0, 1.0, 20.0, ws, {}),
        "pyloop": FunctionModel("pyloop", 0.5, 128.0, 0.9, 1.2, 8.0, ws, {}),
    }


def test_the_fitted_workload_is_the_measured_slice() -> None:
    from training.invoker.invoker import Arrival

    arrivals = [
        Arrival(0, 0.0, "memhog", 50.0),
        Arrival(1, 0.5, "pyloop", 1.0),
        Arrival(2, 1.0, "memhog", 1000.0),  # its working set would exceed the user's 512 MB
        Arrival(3, 1.5, "memhog", 100.0),
    ]
    ref = np.array([0.4, 0.2, math.nan, 0.9])
    wl = fitted_workload(arrivals, ref, _models(), INVOKER_GRID)
    assert wl.n_functions == 2 and wl.fn.tolist() == [0, 1, 0, 0]
    assert wl.user_cpu.tolist() == [8, 2] and wl.user_mem.tolist() == [8, 2]
    assert wl.parallelism.tolist() == [1.0, 1.2] and wl.cpu_frac.tolist() == [1.0, 0.9]
    assert wl.worker_mb.tolist() == [20.0, 8.0]
    assert wl.arrival_s.tolist() == [0.0, 0.5, 1.0, 1.5]
    # measured durations; a missing one is its function's geometric mean
    assert wl.duration_s[[0, 1, 3]].tolist() == [0.4, 0.2, 0.9]
    assert wl.duration_s[2] == pytest.approx(math.sqrt(0.4 * 0.9))
    # working set: idle + a * size / ref, at most the user's memory
    assert wl.working_set_mb.tolist() == [70.0, 21.0, 512.0, 120.0]
    assert wl.noise.tolist() == [1.0] * 4 and wl.cold_start_s.tolist() == [0.0] * 4
    assert not wl.mem_pressure.any()
    # a user's size off the grid goes to the nearest grid point
    coarse = ResourceGrid(cpu_unit_cores=1.0, cpu_units=2, mem_unit_mb=128.0, mem_units=4)
    assert fitted_workload(arrivals, ref, _models(), coarse).user_cpu.tolist() == [2, 1]
    with pytest.raises(ValueError, match="sorted"):
        fitted_workload(arrivals[::-1], ref, _models(), INVOKER_GRID)


# ----------------------------------------------------------------------- the report
def test_the_report_puts_sim_beside_real_and_names_what_is_missing() -> None:
    real = fake_real()
    rep = agreement(real, fake_curves(), ["fixed", "rule", "smallest"], host=HOST)
    res = rep["results"]
    assert list(res) == ["fixed", "rule", "vpa", "smallest"]
    # simulated only / real only: reported as missing, not crashed
    assert res["vpa"]["sim"] is None and res["vpa"]["missing"] == "sim"
    assert res["smallest"]["real"] is None and res["smallest"]["missing"] == "real"
    assert res["vpa"]["abs_error_gmean_rfet"] is None and res["smallest"]["diff"] is None
    for m in ("fixed", "rule"):
        s, r = res[m]["sim"], res[m]["real"]
        for k in (*COMPARED, "gmean_rfet_ci", "slowdown_frac_1_2_ci", "invocations"):
            assert k in s and k in r, k
        # the error arithmetic
        assert res[m]["abs_error_gmean_rfet"] == pytest.approx(
            abs(s["gmean_rfet"] - r["gmean_rfet"])
        )
        for k in COMPARED:
            assert res[m]["diff"][k] == pytest.approx(s[k] - r[k])
        lo, hi = r["gmean_rfet_ci"]
        assert res[m]["sim_within_real_ci"] == (lo <= s["gmean_rfet"] <= hi)
        assert s["invocations"] == r["invocations"] == rep["config"]["invocations"]
    # both sides of Fixed are the reference itself
    assert res["fixed"]["sim"]["gmean_rfet"] == pytest.approx(1.0)
    assert res["fixed"]["real"]["gmean_rfet"] == pytest.approx(1.0)
    assert res["fixed"]["abs_error_gmean_rfet"] == pytest.approx(0.0, abs=1e-9)
    # the real block is bench real's STATS; rule harvested and accelerated in both worlds
    assert res["rule"]["real"]["gmean_rfet"] == real["results"]["rule"]["gmean_rfet"]
    assert res["rule"]["real"]["harvested_frac"] > 0 and res["rule"]["real"]["accelerated_frac"] > 0
    assert res["rule"]["sim"]["accelerated_frac"] > 0
    assert res["rule"]["sim"]["gmean_rfet"] < 1.0
    # pyloop at 0.5 core is CPU-bound: the simulator's rule gives it more and it runs faster
    pyloop = res["rule"]["by_function"]["pyloop"]
    assert pyloop["sim"] < 0.9 and pyloop["real"] == pytest.approx(0.5, rel=0.1)
    assert pyloop["error"] == pytest.approx(pyloop["sim"] - pyloop["real"])
    assert rep["mean_abs_error_gmean_rfet"] == pytest.approx(res["rule"]["abs_error_gmean_rfet"])
    # the config and the fitted parameters used
    assert rep["config"]["slice"] == {"minutes": 0.5, "speedup": 15.0, "seed": 0}
    assert rep["config"]["grid"]["cpu_unit_cores"] == 0.25
    assert set(rep["functions"]) == {s.name for s in SPECS}
    mm = rep["functions"]["matmul"]
    assert mm["parallelism"] > 1.3 and mm["cpu_frac"] > 0.9 and mm["worker_mb"] == 44
    assert sum(f["invocations"] for f in rep["functions"].values()) == len(
        real["records"]["fixed"][0]
    )
    json.dumps(rep)  # the JSON it writes
    text = table(rep)
    assert "missing" in text and "pyloop" in text and "rule" in text
    assert "warning" not in text
    # curves measured on a busy host are flagged
    busy = {**fake_curves(), "load_avg": [0.5, 3.0]}
    assert "load average of up to 3.0 on 2 cores" in table(agreement(real, busy, host=HOST))


def test_a_sidecar_is_simulated_in_the_box_it_ran_in() -> None:
    """bench real's ``smallest@LABEL`` ran with its own ``--sidecar-set``: the simulated side
    decides under the safeguard and memory mode the run recorded for it (read as a node reads
    its config), and a setting the simulator does not model is named, not silently dropped."""
    managers = ("fixed", "smallest", "smallest@whole", "smallest@hard", "smallest@odd")
    real = fake_real(
        managers=managers,
        settings={
            "smallest@whole": {"safeguard": {"mem_margin_units": 1.0}},
            "smallest@hard": {"actuation": {"v1_memory_harvest": "hard"}},
            "smallest@odd": {"actuation": {"throttle_target": 0.5}},
        },
    )
    rep = agreement(real, fake_curves(), host=HOST)
    res = rep["results"]
    sim = {m: res[m]["sim"] for m in managers}
    held = {m: s["alloc_mem_ratio"] for m, s in sim.items()}
    assert held["smallest"] < held["smallest@whole"] - 0.01
    # the hard limit takes the whole unit unless a margin is set, as on a node
    assert abs(held["smallest@hard"] - held["smallest@whole"]) < 0.01
    assert sim["smallest@odd"] == sim["smallest"]
    assert [res[m]["not_simulated"] for m in managers] == [
        *([[]] * 4),
        ["actuation.throttle_target"],
    ]
    text = table(rep)
    assert "warning: smallest@odd ran with settings the simulator does not model" in text
    assert "actuation.throttle_target" in text and "warning: smallest@whole" not in text
    assert "predates recorded sidecar boxes" not in text

    # A box recorded under another day's default is the one simulated, not today's default...
    boxes = real["config"]["sidecar_boxes"]
    boxes["smallest"] = boxes["smallest@whole"]
    then = agreement(real, fake_curves(), ["smallest"], host=HOST)["results"]["smallest"]["sim"]
    assert then == sim["smallest@whole"]
    # ...and a run that recorded no boxes is simulated under today's defaults, with a warning.
    del real["config"]["sidecar_boxes"]
    old = agreement(real, fake_curves(), ["smallest"], host=HOST)
    assert old["results"]["smallest"]["sim"] == sim["smallest"]
    assert "predates recorded sidecar boxes" in table(old)


def test_a_real_run_without_records_or_of_another_slice_is_refused() -> None:
    real = fake_real()
    with pytest.raises(ValueError, match="--records"):
        RealRun.of({k: v for k, v in real.items() if k != "records"})
    other = {**real, "config": {**real["config"], "seed": 1}}
    with pytest.raises(ValueError, match="slice"):
        RealRun.of(other)


# ------------------------------------------------------------------------ end to end
def test_bench_agreement_end_to_end(v1_root: None, tmp_path: Path) -> None:
    """The real side runs for real (0.1 min a manager); the curves are the synthetic ones, so
    the run stays near a minute (bench curves itself is tested in test_curves.py)."""
    curves = tmp_path / "curves.json"
    curves.write_text(json.dumps(fake_curves()))
    out = tmp_path / "agreement.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "bench",
            "agreement",
            "--minutes",
            "0.1",
            "--managers",
            "fixed,rule",
            "--curves",
            str(curves),
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "left behind" not in proc.stderr, proc.stderr
    assert "gmean RFET sim" in proc.stdout, proc.stdout
    got = json.loads(out.read_text())
    real = json.loads((tmp_path / "agreement.real.json").read_text())
    assert set(got["results"]) == {"fixed", "rule"}
    assert got["config"]["repeats"] == 1 and got["config"]["slice"]["minutes"] == 0.1
    for m, row in got["results"].items():
        assert row["real"]["gmean_rfet"] == real["results"][m]["gmean_rfet"]
        assert row["sim"]["invocations"] == got["config"]["invocations"] > 0
        assert row["abs_error_gmean_rfet"] == pytest.approx(
            abs(row["sim"]["gmean_rfet"] - row["real"]["gmean_rfet"])
        )
    assert got["results"]["fixed"]["sim"]["gmean_rfet"] == pytest.approx(1.0)
