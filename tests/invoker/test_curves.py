"""Duration curves of the real functions and the fit of the simulator's CPU model."""

from __future__ import annotations

import asyncio
import os
import uuid

import numpy as np
import pytest

from sidecar import cgroups
from training.invoker.curves import QUOTAS, fit_cpu, measure, model, render_table
from training.invoker.functions import BY_NAME


@pytest.mark.parametrize("phi,p", [(0.8, 1.5), (0.95, 1.2), (0.3, 1.7)])
def test_fit_recovers_phi_and_p_from_a_synthetic_curve(phi: float, p: float) -> None:
    quotas = np.array(QUOTAS)
    times = model(quotas, 0.2, phi, p)
    fit = fit_cpu(quotas, times)
    assert fit["phi"] == pytest.approx(phi, abs=0.02)
    assert fit["p"] == pytest.approx(p, rel=0.03)
    assert fit["max_rel_err"] < 0.01


def test_fit_of_a_saturated_or_flat_curve() -> None:
    quotas = np.array(QUOTAS)
    # p beyond the largest quota is not identifiable from these points: any p >= 2 fits
    fit = fit_cpu(quotas, model(quotas, 0.1, 1.0, 6.0))
    assert fit["phi"] == pytest.approx(1.0, abs=0.02) and fit["p"] >= 1.95
    # a mostly-waiting function: flat curve, so phi ~ 0 or p below the smallest quota (the
    # two are the same model on these points)
    fit = fit_cpu(quotas, np.array([0.201, 0.2, 0.2, 0.2]))
    assert (fit["phi"] < 0.02 or fit["p"] <= 0.26) and fit["max_rel_err"] < 0.01
    # noisy data: still close, error reported
    rng = np.random.default_rng(0)
    noisy = model(quotas, 0.2, 0.9, 1.0) * (1 + 0.03 * rng.standard_normal(4))
    noisy[2] = 0.2
    fit = fit_cpu(quotas, noisy)
    assert fit["phi"] == pytest.approx(0.9, abs=0.1) and fit["max_rel_err"] < 0.1


def test_pyloop_slows_down_at_a_quarter_core(v1_root: None) -> None:
    parent = f"faasrm-test-curves-{uuid.uuid4().hex[:8]}"
    curve = asyncio.run(
        measure(
            BY_NAME["pyloop"],
            1500,
            quotas=(0.25, 1.0),
            mem_factors=(),
            below_peak=False,
            repeats=3,
            parent=parent,
        )
    )
    t_quarter, t_one = curve.cpu_times_s
    # ~0.1 s of pure-Python CPU: at 0.25 core it needs ~4 periods' quota, so >= ~3x slower
    assert t_quarter > 2.5 * t_one, curve
    assert curve.throttled[0] > 0
    assert curve.fit is not None and curve.fit["phi"] > 0.8
    assert "pyloop" in render_table([curve])
    assert not any(
        os.path.exists(os.path.join(cgroups.DEFAULT_ROOT, c, parent))
        for c in cgroups.V1_CONTROLLERS
    )


def test_period_sweep_measures_every_period_and_quota(v1_root: None) -> None:
    from training.invoker.curves import measure_periods, render_periods

    parent = f"faasrm-test-curves-{uuid.uuid4().hex[:8]}"
    sweep = asyncio.run(
        measure_periods(
            BY_NAME["pyloop"],
            1000,
            periods_us=(10_000, 100_000),
            quotas=(0.25, 2.0),
            repeats=2,
            parent=parent,
        )
    )
    assert sweep.periods_us == [10_000, 100_000] and sweep.quotas == [0.25, 2.0]
    assert [len(row) for row in sweep.times_s] == [2, 2]
    assert all(len(runs) == 2 for row in sweep.runs_s for runs in row)
    # ~70 ms of single-threaded work: a quarter core is throttled at either period, 2 cores never
    assert all(row[0] > 0 and row[1] == 0 for row in sweep.throttled), sweep.throttled
    assert all(row[0] > 1.5 * row[1] for row in sweep.times_s), sweep.times_s
    assert 0 < sweep.cpu_s and 0 < sweep.unlimited_s < sweep.times_s[0][0]
    text = render_periods([sweep])
    assert "pyloop" in text and "10" in text.splitlines()[2]
    assert not any(
        os.path.exists(os.path.join(cgroups.DEFAULT_ROOT, c, parent))
        for c in cgroups.V1_CONTROLLERS
    )
