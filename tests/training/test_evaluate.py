"""Baselines and the evaluation: what each manager is known to do, the JSON and the plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sidecar.core.grid import Alloc
from training.evaluate import (
    JSON_KEYS,
    capacity_of,
    evaluate,
    evaluate_capacity,
    evaluate_seeds,
    make_manager,
    render_seeds_table,
    render_table,
)
from training.evidence import sim_report
from training.linear_policies import onnx_policy
from training.sim.cluster import ClusterSim
from training.sim.presets import get_preset

MANAGERS = ["fixed", "greedy", "ensure", "vpa", "oracle"]


@pytest.fixture(scope="module")
def ev():
    return evaluate(get_preset("small"), MANAGERS, seed=2, progress=False)


def test_every_manager_reports_every_key(ev):
    for name in MANAGERS:
        m = ev.results[name]
        assert set(JSON_KEYS) <= set(m)
        assert m["invocations"] == ev.results["fixed"]["invocations"] > 1000


def test_fixed_is_the_reference_point(ev):
    f = ev.results["fixed"]
    assert f["mean_rfet"] == pytest.approx(1.0)
    assert f["harvested_frac"] == f["accelerated_frac"] == 0.0
    assert f["failures"] == 0


def test_one_seeds_percentiles_are_the_pooled_figures_of_that_seed(ev):
    """A seed's own figures (``per_seed``, ``capacity_per_seed``) and the pooled ones of that
    seed alone are one percentile, not two (a seed's capacity must not depend on which)."""
    pooled = sim_report({m: [r] for m, r in ev.runs.items()}, resamples=10)
    for m, row in ev.results.items():
        for k in ("p98_rfet", "p98_duration_s", "p98_response_s"):
            assert row[k] == pooled[m][k], (m, k)


def test_greedy_is_punished_for_careless_harvesting(ev):
    g = ev.results["greedy"]  # under the OOM hold (the default): slowed, not killed
    assert g["failures"] == 0 and g["give_backs"] > 1000
    assert g["slowdown_frac_1_2"] > 0.05
    assert g["mean_rfet"] > 1.05
    hard = get_preset("small").with_cluster(oom_hold=False)  # the reference's: killed too
    h = evaluate(hard, ["fixed", "greedy"], seed=2, progress=False).results["greedy"]
    assert h["failures"] > 0
    assert h["mean_rfet"] > g["mean_rfet"] + 0.1


def test_ensure_touches_cpu_only(ev):
    e = ev.results["ensure"]
    assert e["failures"] == 0
    assert e["accelerated_frac"] > 0.1
    assert e["mean_rfet"] < 1.0


def test_oracle_is_the_bound(ev):
    o = ev.results["oracle"]
    for name in ("fixed", "greedy", "ensure", "vpa"):
        assert o["mean_rfet"] <= ev.results[name]["mean_rfet"] + 0.01
    assert o["p98_rfet"] <= 1.0 + 1e-9


def test_table_lists_every_manager(ev):
    lines = render_table(ev).splitlines()
    assert [ln.split()[0] for ln in lines[2:]] == MANAGERS
    assert "mean RFET" in lines[1]


def test_cli_sim_eval_writes_json_and_plots(tmp_path):
    out = tmp_path / "eval.json"
    cmd = [
        sys.executable,
        "-m",
        "sidecar",
        "sim",
        "eval",
        "--preset",
        "sample",
        "--managers",
        "fixed,oracle",
        "--json",
        str(out),
        "--plots",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"fixed", "oracle"}
    assert set(JSON_KEYS) <= set(data["oracle"])
    assert data["oracle"]["mean_rfet"] < data["fixed"]["mean_rfet"]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [
        "sample_seed1_exec_cdf.png",
        "sample_seed1_front.png",
        "sample_seed1_rfet_cdf.png",
    ]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_cli_rejects_an_unknown_manager():
    cmd = [
        sys.executable,
        "-m",
        "sidecar",
        "sim",
        "eval",
        "--preset",
        "sample",
        "--managers",
        "nope",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown manager 'nope'" in proc.stderr


def test_cli_trace_generate_then_replay(tmp_path):
    gen = [
        sys.executable,
        "-m",
        "sidecar",
        "trace",
        "generate",
        "--functions",
        "30",
        "--minutes",
        "5",
        "--seed",
        "4",
        "--out",
        str(tmp_path / "tr"),
    ]
    assert subprocess.run(gen, capture_output=True, timeout=60).returncode == 0
    out = tmp_path / "e.json"
    ev = [
        sys.executable,
        "-m",
        "sidecar",
        "sim",
        "eval",
        "--preset",
        "small",
        "--trace",
        str(tmp_path / "tr"),
        "--managers",
        "fixed",
        "--json",
        str(out),
    ]
    proc = subprocess.run(ev, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from training.traces import load_azure

    assert (
        json.loads(out.read_text())["fixed"]["invocations"]
        == load_azure(tmp_path / "tr").total_invocations()
    )


def test_bench_sim_json_has_the_named_key(tmp_path):
    out = tmp_path / "b.json"
    cmd = [
        sys.executable,
        "-m",
        "sidecar",
        "bench",
        "sim",
        "--preset",
        "sample",
        "--decisions",
        "400",
        "--envs",
        "2",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    assert figures["decisions_per_s"] > 0
    assert np.isfinite(figures["ratio_vs_fixed"])


def _closest_to_user(req) -> Alloc:
    g = req.guard
    return Alloc(
        min(max(req.user.cpu, g.cpu_lo), g.cpu_hi), min(max(req.user.mem, g.mem_lo), g.mem_hi)
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("rule", _closest_to_user),
        ("smallest", lambda req: Alloc(req.guard.cpu_lo, req.guard.mem_lo)),
    ],
)
def test_the_daemons_rules_decide_through_the_shared_path(name, expected):
    p = get_preset("small")
    sim = ClusterSim(p.build(2), p.cluster, p.grid)
    mgr = make_manager(name)
    assert mgr.name == name
    mgr.reset(sim)
    n = 0
    while (req := sim.next_request()) is not None:
        alloc = mgr.decide(sim, req)
        assert alloc == expected(req), (req.inv, req.guard.reason)
        sim.apply(alloc)
        n += 1
    assert n == sim.wl.n_invocations


def test_the_daemons_rules_as_managers_in_the_evaluation():
    res = evaluate(get_preset("small"), ["rule", "smallest"], seed=2, progress=False).results
    # rule: the user's size wherever the safeguard allows it, so never below it, never an OOM
    assert res["rule"]["harvested_frac"] == 0.0 and res["rule"]["failures"] == 0
    # smallest: whatever the safeguard lets it harvest; it outgrows some harvests, which the
    # OOM hold gives back (the reference's hard limit kills them)
    s = res["smallest"]
    assert s["harvested_frac"] > 0.2 and s["failures"] == 0 and s["give_backs"] > 0
    hard = get_preset("small").with_cluster(oom_hold=False)
    killed = evaluate(hard, ["smallest"], seed=2, progress=False).results["smallest"]
    assert killed["failures"] > 0


# ------------------------------------------------------------------------------------ capacity
def test_capacity_is_the_highest_load_held_with_every_lower_one():
    p98 = {1.0: 10.0, 1.25: 14.0, 1.5: 16.0, 1.75: 12.0, 2.0: 40.0}
    assert capacity_of(p98, 10.0) == 1.25  # 1.5 breaks 15 s; 1.75 recovering does not count
    assert capacity_of(p98, 20.0) == 1.75
    assert capacity_of(p98, 5.0) == 0.0  # not even the base load
    assert capacity_of({1.0: float("nan")}, 10.0) == 0.0


def test_capacity_runs_every_manager_at_every_load_on_paired_invocations():
    rep = evaluate_capacity(
        get_preset("sample"), ["oracle"], [1, 2], [2.0, 1.0, 4.0], progress=False
    )
    assert rep["config"]["loads"] == [1.0, 2.0, 4.0] and rep["config"]["managers"][0] == "fixed"
    res = rep["results"]
    assert set(res) == {"fixed", "oracle"}
    n = res["fixed"]["loads"]["1"]["invocations"]
    for m in res.values():
        assert list(m["loads"]) == ["1", "2", "4"]
        for row in m["loads"].values():
            assert row["invocations"] == n  # the same invocations at every load
            lo, hi = row["p98_response_s_ci"]
            assert lo <= row["p98_response_s"] <= hi
            assert set(row["per_seed"]) == {"1", "2"}
        assert m["capacity"] in (0.0, 1.0, 2.0, 4.0)
        assert set(m["capacity_per_seed"]) == {"1", "2"}
    fixed = res["fixed"]["loads"]
    assert fixed["1"]["mean_rfet"] == pytest.approx(1.0)
    # arrivals twice and four times as fast: the response time's tail can only grow
    assert fixed["4"]["p98_response_s"] >= fixed["1"]["p98_response_s"]
    ref = rep["reference_p98_response_s"]
    assert ref["pooled"] == fixed["1"]["p98_response_s"]
    assert res["fixed"]["capacity"] >= 1.0  # Fixed holds its own base load
    with pytest.raises(ValueError, match="1.0"):
        evaluate_capacity(get_preset("sample"), ["fixed"], [1], [1.5, 2.0], progress=False)


def test_cli_sim_capacity_writes_json(tmp_path):
    out = tmp_path / "cap.json"
    cmd = [
        sys.executable,
        "-m",
        "sidecar",
        "sim",
        "capacity",
        "--preset",
        "sample",
        "--seeds",
        "1",
        "--managers",
        "rule",
        "--loads",
        "1.0,1.5",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "capacity" in proc.stdout
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"fixed", "rule"}
    assert set(data["results"]["rule"]["loads"]) == {"1", "1.5"}


def test_cli_sim_eval_refuses_a_model_from_another_feature_schema(tmp_path):
    onnx = pytest.importorskip("onnx")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sidecar"))
    from sidecar_helpers import onnx_policy

    model = onnx.load_from_string(onnx_policy("harvest", grid=get_preset("sample").grid))
    onnx.helper.set_model_props(model, {"feature_version": "1", "schema_hash": "0" * 16})
    old = tmp_path / "old.onnx"
    old.write_bytes(model.SerializeToString())
    cmd = [sys.executable, "-m", "sidecar", "sim", "eval", "--preset", "sample"]
    cmd += ["--managers", "fixed,learned", "--model", str(old)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "feature_version '1'" in proc.stderr and "Train and export" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_learned_policys_choices_are_compared_with_each_rule(tmp_path: Path) -> None:
    """A policy that scores like ``smallest`` never chooses unlike it; it chooses unlike ``rule``
    where harvesting is allowed, and those choices are paired with ``rule``'s own run."""
    p = get_preset("sample")
    model = tmp_path / "harvest.onnx"
    model.write_bytes(onnx_policy("harvest", grid=p.grid))
    ev = evaluate_seeds(p, ["rule", "smallest", "learned"], [1, 2], model=model, progress=False)
    ch = ev.pooled["learned"]["choices"]
    assert 0.0 < ch["with_choice"]["value"] <= 1.0
    assert ch["smallest/differs"]["value"] == 0.0
    assert 0.0 < ch["rule/differs"]["value"] <= ch["with_choice"]["value"]
    # less memory than rule on the invocations where it chose unlike rule
    r = ch["rule/mem_held_ratio"]
    assert r["ci"][0] <= r["value"] <= r["ci"][1] and r["value"] < 1.0
    d = ch["rule/mean_rfet_diff"]
    assert d["ci"][0] <= d["value"] <= d["ci"][1]
    # the same figures as the learned run against smallest's (identical choices, same workload)
    assert ev.pooled["learned"]["mean_rfet"] == ev.pooled["smallest"]["mean_rfet"]
    assert "choices" not in ev.pooled["rule"] and "choices" not in ev.pooled["smallest"]
    assert "unlike rule in" in render_seeds_table(ev)


def test_the_user_linear_policy_scores_as_the_daemons_rule() -> None:
    from sidecar.core.features import N_FEATURES
    from sidecar.core.policy import OnnxScorer, fallback_scorer

    rows = np.random.default_rng(0).normal(size=(64, N_FEATURES)).astype(np.float32)
    got = OnnxScorer(onnx_policy("user", None)).scores(rows)
    assert np.allclose(got, fallback_scorer("user").scores(rows), atol=1e-5)


def test_a_presets_safeguard_sees_the_admission_queue() -> None:
    """With ``decline_when_queued`` on the preset, every accelerate range decided while the
    simulator's admission queue is not empty also allows the user's size; off, none does."""
    from sidecar.core.policy import fallback_scorer
    from sidecar.core.safeguard import ACCELERATE, SafeguardConfig
    from training.sim.cluster import ClusterSim
    from training.sim.presets import get_preset

    counts = {}
    for on in (True, False):
        preset = get_preset("small", safeguard=SafeguardConfig(decline_when_queued=on))
        wl = preset.build(3).scaled(3.0)
        sim = ClusterSim(wl, preset.cluster, preset.grid, preset.safeguard)
        smallest = fallback_scorer("smallest")
        opened = closed = 0
        for _ in range(6000):
            req = sim.next_request()
            if req is None:
                break
            g, node = req.guard, sim.node_state()
            if g.cpu_mode == ACCELERATE and node.pending > 0:
                opened += g.cpu_lo <= req.user.cpu
                closed += g.cpu_lo > req.user.cpu
            d = sim.decider.decide(
                smallest, node, req.stats, req.guard_state, req.user, req.now_s, guard=g
            )
            sim.apply(sim.grid.alloc(d.action))
        counts[on] = (opened, closed)
    assert counts[True][0] > 0 and counts[True][1] == 0, counts
    assert counts[False][1] > 0
