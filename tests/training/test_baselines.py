"""The baseline rules (Greedy, ENSURE, VPA): one implementation for the simulator and the real
invoker, fed ``Run`` observations in cores and MB (no cgroups here)."""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np
import pytest

from sidecar.core.grid import ResourceGrid
from training.baselines import (
    BASELINE_RULES,
    BASELINES,
    USER,
    Ensure,
    Greedy,
    Run,
    SimulatedRule,
    Vpa,
)
from training.invoker.invoker import kind
from training.sim.cluster import ClusterSim
from training.sim.presets import get_preset

G = ResourceGrid()  # 1 core x 8, 64 MB x 8


def run(
    given: tuple[float, float],
    cpu: float,
    mem: float,
    exec_s: float = 1.0,
    baseline_s: float = math.nan,
    outcome: str = "success",
) -> Run:
    return Run(*given, cpu, mem, exec_s, baseline_s, outcome != "success", outcome == "oom")


def test_greedy_steps_from_off_grid_user_sizes() -> None:
    # a real user's size need not lie on the grid: "up" is the next grid point strictly above
    # it, "down" the next strictly below, both within [1 unit, grid max]
    cases = [  # (given cores, MB), busy?, expected units
        ((0.5, 100.0), True, (1, 2)),
        ((0.5, 100.0), False, (1, 1)),
        ((1.0, 128.0), True, (2, 3)),
        ((2.0, 128.0), False, (1, 1)),
        ((8.0, 512.0), True, (8, 8)),
        ((1.0, 64.0), False, (1, 1)),
    ]
    for given, busy, want in cases:
        m = Greedy(G)
        use = 1.0 if busy else 0.0
        m.observe("f", run(given, use * given[0], use * given[1]))
        assert m.decide("f") == want, (given, busy)


def test_greedy_up_down_and_back_after_oom() -> None:
    m = Greedy(G)
    assert m.decide("f") == USER
    m.observe("f", run((2.0, 512.0), 0.5, 100))  # idle both: one down each
    assert m.decide("f") == (1, 7)
    m.observe("f", run((1.0, 448.0), 0.95, 430))  # >= 90% of both: one up each
    assert m.decide("f") == (2, 8)
    m.observe("f", run((2.0, 512.0), 1.9, 100))  # CPU busy, memory idle
    assert m.decide("f") == (3, 7)
    m.observe("f", run((3.0, 448.0), 0.1, 448, outcome="oom"))
    assert m.decide("f") == USER
    assert m.decide("other") == USER  # per function


def test_ensure_adds_cpu_when_slow_and_reclaims_after_three_calm_runs() -> None:
    m, user = Ensure(G), (1.0, 256.0)
    m.observe("f", run(user, 0.99, 100, exec_s=1.2, baseline_s=1.0))  # > 1.1x the baseline
    assert m.decide("f") == (2, None)  # CPU only, memory stays the user's
    for i in range(2):
        m.observe("f", run((2.0, 256.0), 0.5, 100, exec_s=0.8, baseline_s=1.0))  # calm
        assert m.decide("f") == (2, None), i
    m.observe("f", run((2.0, 256.0), 0.5, 100, exec_s=0.8, baseline_s=1.0))
    assert m.decide("f") == (1, None)
    m.observe("f", run((1.0, 256.0), 0.9, 100, exec_s=1.05, baseline_s=1.0))  # busy, in time
    assert m.decide("f") == (1, None)


def test_ensure_calm_count_resets_on_slow_run() -> None:
    m, user = Ensure(G), (2.0, 512.0)
    m.observe("f", run(user, 0.3, 50, exec_s=0.5, baseline_s=1.0))
    m.observe("f", run(user, 0.3, 50, exec_s=0.5, baseline_s=1.0))
    m.observe("f", run(user, 0.3, 50, exec_s=2.0, baseline_s=1.0))  # slow: +1, calm back to 0
    assert m.decide("f") == (3, None)
    for _ in range(3):
        m.observe("f", run((3.0, 512.0), 0.3, 50, exec_s=0.5, baseline_s=1.0))
    assert m.decide("f") == (2, None)


def test_ensure_changes_nothing_without_a_baseline_or_after_a_failure() -> None:
    m, user = Ensure(G), (1.0, 256.0)
    m.observe("f", run(user, 0.9, 100, exec_s=9.0))  # no user-size run measured yet (NaN)
    m.observe("f", run(user, 0.9, 100, exec_s=9.0, baseline_s=1.0, outcome="failure"))
    assert m.decide("f") == USER
    m.observe("f", run((0.5, 256.0), 0.9, 100, exec_s=9.0, baseline_s=1.0))  # off the grid
    assert m.decide("f") == (1, None)


def test_vpa_waits_three_runs_then_p90_and_max_with_margin() -> None:
    m, user = Vpa(G), (2.0, 512.0)
    for cpu, mem in [(0.5, 100.0), (0.9, 120.0)]:
        m.observe("f", run(user, cpu, mem))
        assert m.decide("f") == USER
    m.observe("f", run(user, 0.95, 110.0))
    # p90 of (0.5, 0.9, 0.95) = 0.94 x 1.15 = 1.08 -> 2 cores; max 120 x 1.15 = 138 -> 192 MB
    assert m.decide("f") == (2, 3)
    m.observe("f", run((2.0, 192.0), 0.1, 10.0, outcome="oom"))  # records 1.2 x 192
    assert m.decide("f")[1] == G.mem_units_ceil(192 * 1.2 * 1.15)
    m.observe("f", run((2.0, 192.0), 0.1, 10.0, outcome="failure"))  # not an OOM: as measured
    assert list(m.mem["f"])[-1] == 10.0
    small = Vpa(G)
    for _ in range(3):
        small.observe("s", run(user, 0.01, 5.0))
    assert small.decide("s") == (1, 1)  # clamped to one unit


def test_vpa_clamps_to_grid_max() -> None:
    m = Vpa(G)
    for _ in range(3):
        m.observe("f", run((2.0, 512.0), 7.9, 600.0))
    assert m.decide("f") == (8, 8)


def test_the_simulator_drives_the_same_rules() -> None:
    assert list(BASELINE_RULES) == ["greedy", "ensure", "vpa"]
    for name, rule in BASELINE_RULES.items():
        mgr = BASELINES[name]()
        assert isinstance(mgr, SimulatedRule) and mgr.rule_type is rule and mgr.name == name


@pytest.mark.parametrize(
    ("cpu", "mem", "want"),
    [(1.0, 256.0, "user"), (1.0, 192.0, "harvested"), (2.0, 192.0, "accelerated")],
)
def test_kind(cpu: float, mem: float, want: str) -> None:
    assert kind(1.0, 256.0, cpu, mem) == want
    assert kind(0.5, 128.0, 1.0, 128.0) == "accelerated"


def test_ensure_in_the_simulator_compares_a_run_with_the_baseline_known_before_it() -> None:
    # As on a node (the reward's "baseline before this run") and on the real invoker (a baseline
    # measured beforehand): a run at the user's size must not be compared with a baseline that
    # already averages it in, which hides its own slowdown.
    class Recording(Ensure):
        def __init__(self, grid: ResourceGrid) -> None:
            super().__init__(grid)
            self.runs: list[Run] = []

        def observe(self, fn: Hashable, r: Run) -> None:
            self.runs.append(r)
            super().observe(fn, r)

    p = get_preset("small")
    sim = ClusterSim(p.build(3), p.cluster, p.grid)
    mgr = SimulatedRule(Recording)
    mgr.reset(sim)
    known: dict[int, float] = {}  # the function's baseline when each invocation arrived
    seen: list[tuple[float, float]] = []
    while (req := sim.next_request()) is not None:
        for inv in sim.finished:
            mgr.observe(sim, inv)
            seen.append((mgr.rule.runs[-1].baseline_s, known[inv]))
        sim.finished.clear()
        known[req.inv] = req.stats.baseline_duration_s
        sim.apply(mgr.decide(sim, req))
    assert len(seen) > 1000 and sum(b == b for _, b in seen) > 1000
    np.testing.assert_array_equal(np.array(seen)[:, 0], np.array(seen)[:, 1])
