"""The evaluation method: paired bootstrap intervals with known answers, verdicts, the noise
row, the interleaving order and the duration classes (training/evidence.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from training import evidence
from training.evidence import Bootstrap, Pool, Replays, SimRun


def _replays(exec_s: np.ndarray, cpu: float = 1.0, mem: float = 256.0) -> Replays:
    return Replays(
        exec_s=exec_s,
        response_s=exec_s + 0.01,
        core_s=cpu * exec_s,
        mb_s=mem * exec_s,
        failed=np.zeros(exec_s.shape, bool),
    )


def _world(n: int = 300, rounds: int = 2, sigma: float = 0.1, seed: int = 0):
    """True times per invocation (log-uniform 10 ms .. 3 s) and a run-to-run noise draw."""
    rng = np.random.default_rng(seed)
    true = np.exp(rng.uniform(math.log(0.01), math.log(3.0), n))

    def run(factor: float = 1.0) -> np.ndarray:
        return true[None, :] * factor * np.exp(rng.normal(0, sigma, (rounds, n)))

    fns = np.array([f"f{i % 5}" for i in range(n)])
    return run, fns


def test_same_distribution_gives_an_interval_containing_one_and_a_20pct_shift_excludes_it():
    run, fns = _world()
    fixed = _replays(run())
    rep = evidence.real_report(
        {
            "fixed": fixed,
            "same": _replays(run()),
            "faster": _replays(run(0.8)),
            "slower": _replays(run(1.2)),
        },
        fns,
        resamples=1000,
    )
    same, fast, slow = (rep["results"][m] for m in ("same", "faster", "slower"))
    lo, hi = same["gmean_rfet_ci"]
    assert lo < 1.0 < hi and same["verdict"] == "indistinguishable"
    assert fast["gmean_rfet_ci"][1] < 1.0 and fast["verdict"] == "faster"
    assert fast["gmean_rfet"] == pytest.approx(0.8, abs=0.03)
    assert slow["gmean_rfet_ci"][0] > 1.0 and slow["verdict"] == "slower"
    # the noise row (Fixed against its other round) is centred on 1 and says nothing either way
    noise = rep["noise"]
    assert noise["gmean_rfet_ci"][0] < 1.0 < noise["gmean_rfet_ci"][1]
    assert noise["verdict"] == "indistinguishable"
    # a manager drawn like Fixed slows down no more invocations than the noise row does
    assert same["slowdown_vs_noise"] == "within"
    assert slow["slowdown_vs_noise"] == "above"
    # paired comparison between managers
    assert rep["pairs"]["faster/slower"]["verdict"] == "faster faster"
    assert rep["pairs"]["same/faster"]["verdict"] == "faster faster"
    assert rep["results"]["fixed"]["verdict"] == "reference"


def test_stats_keys_duration_classes_functions_and_resources():
    run, fns = _world(n=200)
    fixed = _replays(run())
    half = _replays(run(), cpu=0.5, mem=128.0)
    rep = evidence.real_report({"fixed": fixed, "half": half}, fns, resamples=200)
    row = rep["results"]["half"]
    for key in (
        "invocations", "gmean_rfet", "gmean_rfet_ci", "mean_rfet", "p98_rfet", "p98_rfet_ci",
        "slowdown_frac_1_2", "slowdown_frac_1_2_ci", "time_weighted_rfet", "p98_duration_s",
        "p98_response_s", "response_ratio", "oom_kills", "failures", "verdict", "alloc_cpu_ratio",
        "alloc_mem_ratio", "by_duration", "by_function",
    ):  # fmt: skip
        assert key in row, key
    assert set(row["by_duration"]) == {"lt_0.1s", "0.1_1s", "ge_1s"}
    assert set(row["by_function"]) == {f"f{i}" for i in range(5)}
    assert row["invocations"] == 400  # 2 rounds x 200
    assert sum(b["invocations"] for b in row["by_duration"].values()) == 400
    # half the resources for about the same time: about half the allocated core- and MB-seconds
    assert row["alloc_cpu_ratio"] == pytest.approx(0.5, abs=0.05)
    assert row["alloc_mem_ratio"] == pytest.approx(0.5, abs=0.05)
    lo, hi = row["alloc_cpu_ratio_ci"]
    assert lo <= row["alloc_cpu_ratio"] <= hi
    assert rep["results"]["fixed"]["alloc_cpu_ratio"] == pytest.approx(1.0, abs=1e-9)


def test_response_ratio_counts_the_wait_beside_the_run_paired_by_invocation():
    """Same execution, but Fixed's calls also waited a second each: the manager that waits none
    holds a known share of Fixed's response time, with an interval that excludes 1."""
    run, fns = _world(n=300)
    exec_s = run()
    ones, none = np.ones(exec_s.shape), np.zeros(exec_s.shape, bool)
    waited = Replays(exec_s, exec_s + 1.0, ones, ones, none)
    prompt = _replays(exec_s)  # the same runs, 10 ms of response overhead, no wait
    rep = evidence.real_report({"fixed": waited, "prompt": prompt}, fns, resamples=500)
    row = rep["results"]["prompt"]
    want = (exec_s + 0.01).sum() / (exec_s + 1.0).sum()
    assert row["response_ratio"] == pytest.approx(want, rel=1e-9)
    lo, hi = row["response_ratio_ci"]
    assert lo <= want <= hi < 1.0
    assert row["gmean_rfet"] == pytest.approx(1.0, abs=1e-9)  # execution alone: no difference
    assert rep["results"]["fixed"]["response_ratio"] == pytest.approx(1.0, abs=1e-9)


def test_a_class_only_slowed_shows_in_its_class_and_not_the_others():
    run, fns = _world(n=600, sigma=0.05)
    fixed = _replays(run())
    ref = evidence.reference_times(fixed)
    factor = np.where(ref < 0.1, 1.3, 1.0)  # harm only to the short invocations
    hurt = _replays(run() * factor[None, :])
    row = evidence.real_report({"fixed": fixed, "hurt": hurt}, fns, resamples=500)["results"][
        "hurt"
    ]
    assert row["by_duration"]["lt_0.1s"]["verdict"] == "slower"
    assert row["by_duration"]["0.1_1s"]["verdict"] == "indistinguishable"
    assert row["by_duration"]["ge_1s"]["verdict"] == "indistinguishable"


def test_failed_invocations_are_counted_and_left_out_of_rfet():
    run, fns = _world(n=100)
    fixed = _replays(run())
    m = _replays(run())
    failed = m.failed.copy()
    failed[0, :10] = True
    m = Replays(m.exec_s, m.response_s, m.core_s, m.mb_s, failed, oom_kills=3)
    row = evidence.real_report({"fixed": fixed, "m": m}, fns, resamples=100)["results"]["m"]
    assert row["failures"] == 10 and row["oom_kills"] == 3
    assert row["invocations"] == 190


def test_a_slow_spell_in_one_managers_round_shows_in_its_rounds_and_marks_its_pairs():
    """Two managers that are the same policy; the host slows by 30% during the second round of
    one of them only. The noise row (Fixed's rounds) cannot see it; that manager's own rounds
    do, and the pair between the two is marked."""
    run, fns = _world()
    spelled = run()
    spelled[1] *= 1.3
    rep = evidence.real_report(
        {"fixed": _replays(run()), "a": _replays(run()), "b": _replays(spelled)}, fns, 1000
    )
    a, b = rep["results"]["a"], rep["results"]["b"]
    assert rep["noise"]["verdict"] == "indistinguishable"
    assert a["rounds_agree"] and a["rounds_gmean_ratio_ci"][0] < 1.0 < a["rounds_gmean_ratio_ci"][1]
    assert not b["rounds_agree"] and b["rounds_gmean_ratio"] == pytest.approx(1.3, abs=0.05)
    assert rep["results"]["fixed"]["rounds_agree"]
    # the spell makes b look slower than a, with an interval that excludes 1: marked, not a finding
    assert rep["pairs"]["a/b"]["verdict"] == "a faster" and not rep["pairs"]["a/b"]["rounds_agree"]


def test_one_round_has_no_noise_row():
    run, fns = _world(rounds=1)
    rep = evidence.real_report({"fixed": _replays(run()), "m": _replays(run(0.5))}, fns, 100)
    assert rep["noise"] is None
    assert rep["results"]["m"]["verdict"] == "faster"
    assert "slowdown_vs_noise" not in rep["results"]["m"]
    assert "rounds_agree" not in rep["results"]["m"] and rep["pairs"] == {}


def test_bootstrap_is_reproducible_and_resamples_invocations():
    boot = Bootstrap([50], resamples=20, seed=7)
    blocks = boot.chunks(elements=50)
    assert blocks[0].shape == (1, 50) and (blocks[0] == 1).all()
    w = np.concatenate(blocks[1:])
    assert w.shape == (20, 50)
    assert (w.sum(axis=1) == 50).all()  # each resample draws 50 invocations with replacement
    assert (w == 0).any()  # and leaves some out
    assert np.array_equal(w, np.concatenate(Bootstrap([50], 20, seed=7).chunks(50)[1:]))
    # groups (seeds): each resample draws as many groups as there are, with replacement
    wg = np.concatenate(Bootstrap([30, 30], resamples=50, seed=1).chunks(60)[1:])
    assert set(wg.sum(axis=1).tolist()) == {60.0}
    assert ((wg[:, :30].sum(axis=1) == 0) | (wg[:, 30:].sum(axis=1) == 0)).any()


def test_weighted_quantile_matches_numpy_inverted_cdf_and_repeats():
    rng = np.random.default_rng(3)
    x = rng.lognormal(size=101)
    pool = Pool(np.arange(101))
    got = pool.quantile(x, 0.98)(np.ones((1, 101)))[0]
    assert got == np.percentile(x, 98, method="inverted_cdf")
    # weight 2 on every unit = each value twice: the same quantile
    assert pool.quantile(x, 0.5)(np.full((1, 101), 2.0))[0] == np.median(x)
    # a unit drawn 0 times does not count
    w = np.ones((1, 101))
    w[0, np.argmax(x)] = 0
    assert pool.quantile(x, 1.0)(w)[0] == np.sort(x)[-2]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_round_order_balances_a_steady_drift(n: int) -> None:
    ms = ["fixed", "rule", "smallest", "learned"][:n]
    orders = [evidence.round_order(ms, r) for r in range(2 * n)]
    assert orders[0] == ms and orders[1] == ms[::-1]
    assert all(sorted(o) == sorted(ms) for o in orders)
    # every two rounds: the same mean position for every manager (a linear drift cancels)
    for r in range(0, 2 * n, 2):
        pos = {m: orders[r].index(m) + orders[r + 1].index(m) for m in ms}
        assert len(set(pos.values())) == 1, (r, pos)
    # over 2n rounds every manager takes every position equally often
    for m in ms:
        assert sorted(o.index(m) for o in orders) == sorted(list(range(n)) * 2)
    assert evidence.round_order(ms, 2 * n) == ms


def test_duration_classes_and_verdicts():
    assert evidence.duration_class(0.0) == "lt_0.1s"
    assert evidence.duration_class(0.0999) == "lt_0.1s"
    assert evidence.duration_class(0.1) == "0.1_1s"
    assert evidence.duration_class(0.999) == "0.1_1s"
    assert evidence.duration_class(1.0) == "ge_1s"
    assert evidence.duration_class(600.0) == "ge_1s"
    assert evidence.verdict([0.8, 0.95]) == "faster"
    assert evidence.verdict([1.01, 1.2]) == "slower"
    assert evidence.verdict([0.9, 1.1]) == "indistinguishable"
    assert evidence.verdict([0.9, 1.0]) == "indistinguishable"


def _sim_run(rng: np.random.Generator, base: np.ndarray, factor: float, cpu: float) -> SimRun:
    exec_s = base * factor * np.exp(rng.normal(0, 0.05, base.size))
    n = base.size
    return SimRun(
        exec_s=exec_s,
        baseline_s=base,
        response_s=exec_s + 0.5,
        failed=np.zeros(n, bool),
        cpu_cores=np.full(n, cpu),
        mem_mb=np.full(n, 128.0),
        user_cores=np.ones(n),
        user_mb=np.full(n, 256.0),
    )


def test_sim_report_pools_seeds_with_intervals_and_paired_differences():
    rng = np.random.default_rng(5)
    bases = [np.exp(rng.uniform(-5, 2, n)) for n in (400, 500)]
    runs = {
        "fixed": [_sim_run(rng, b, 1.0, 1.0) for b in bases],
        "rule": [_sim_run(rng, b, 0.95, 1.0) for b in bases],
        "learned": [_sim_run(rng, b, 0.85, 0.5) for b in bases],
    }
    rep = evidence.sim_report(runs, resamples=300)
    res = rep
    assert res["learned"]["invocations"] == 900
    lo, hi = res["learned"]["mean_rfet_ci"]
    assert lo <= res["learned"]["mean_rfet"] <= hi < res["rule"]["mean_rfet_ci"][0]
    assert res["learned"]["alloc_cpu_ratio"] == pytest.approx(0.5 * 0.85, rel=0.05)
    assert res["learned"]["alloc_mem_ratio"] == pytest.approx(0.5 * 0.85, rel=0.05)
    assert res["learned"]["vs"]["rule"]["verdict"] == "lower"
    assert res["rule"]["vs"]["learned"]["verdict"] == "higher"
    assert res["rule"]["vs"]["learned"]["mean_rfet_diff"] == pytest.approx(
        -res["learned"]["vs"]["rule"]["mean_rfet_diff"]
    )
    assert res["fixed"]["vs"]["rule"]["verdict"] == "higher"
    for key in ("mean_rfet", "mean_rfet_ci", "p98_rfet", "p98_response_s", "p98_response_s_ci"):
        assert key in res["fixed"]
    assert set(res["fixed"]["by_duration"]) == set(evidence.DURATION_CLASSES)


def test_sim_classes_are_fixeds_whatever_the_order_of_the_managers():
    """A manager's counterfactual baseline carries the load its own choices made, so only
    Fixed's (its execution time) classes an invocation the same for every order of managers."""
    rng = np.random.default_rng(2)
    base = np.exp(rng.uniform(math.log(0.01), math.log(3.0), 400))
    fixed = _sim_run(rng, base, 1.0, 1.0)
    busier = replace(_sim_run(rng, base, 1.0, 1.0), baseline_s=base * 1.3)
    classes = [evidence.duration_class(x) for x in base]
    want = {k: classes.count(k) for k in evidence.DURATION_CLASSES}
    for runs in ({"fixed": [fixed], "busier": [busier]}, {"busier": [busier], "fixed": [fixed]}):
        rep = evidence.sim_report(runs, resamples=20)
        got = {k: rep["busier"]["by_duration"][k]["invocations"] for k in want}
        assert got == want, list(runs)
