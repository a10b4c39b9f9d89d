"""The invoker-applied managers' pure rules (no cgroups)."""

from __future__ import annotations

import pytest

from training.invoker.managers import Alloc, Ensure, Greedy, Grid, Observation, Vpa, kind, make

G = Grid()  # 1 core x 8, 64 MB x 8


def obs(cpu: float, mem: float, given: Alloc, exec_s: float = 1.0, outcome: str = "success"):
    return Observation(given, cpu, mem, exec_s, outcome)


def test_grid_steps_off_grid_user_sizes() -> None:
    assert G.cpu_up(0.5) == 1.0 and G.cpu_up(1.0) == 2.0 and G.cpu_up(8.0) == 8.0
    assert G.cpu_down(2.0) == 1.0 and G.cpu_down(1.0) == 1.0 and G.cpu_down(0.5) == 1.0
    assert G.mem_up(128) == 192 and G.mem_down(128) == 64 and G.mem_down(64) == 64
    assert G.mem_up(512) == 512 and G.mem_down(100) == 64 and G.mem_up(100) == 128
    assert G.cpu_ceil(1.15) == 2.0 and G.cpu_ceil(0.01) == 1.0 and G.cpu_ceil(30) == 8.0
    assert G.mem_ceil(64.0) == 64 and G.mem_ceil(64.5) == 128 and G.mem_ceil(9999) == 512


def test_greedy_up_down_and_back_after_oom() -> None:
    m, user = Greedy(), Alloc(2.0, 512)
    assert m.decide("f", user) == user
    m.observe("f", user, obs(0.5, 100, user))  # idle both: one down each
    a = m.decide("f", user)
    assert a == Alloc(1.0, 448)
    m.observe("f", user, obs(0.95, 430, a))  # >= 90% of both: one up each
    b = m.decide("f", user)
    assert b == Alloc(2.0, 512)
    m.observe("f", user, obs(1.9, 100, b))  # CPU busy, memory idle
    assert m.decide("f", user) == Alloc(3.0, 448)
    m.observe("f", user, obs(0.1, 448, Alloc(3.0, 448), outcome="oom"))
    assert m.decide("f", user) == user
    assert m.decide("other", Alloc(1.0, 256)) == Alloc(1.0, 256)  # per function


def test_greedy_respects_the_applied_allocation() -> None:
    # the invoker reports what the container really had (a refused memory write keeps the user's)
    m, user = Greedy(), Alloc(1.0, 256)
    m.observe("f", user, obs(0.2, 50, Alloc(1.0, 256)))
    assert m.decide("f", user) == Alloc(1.0, 192)


def test_ensure_adds_cpu_when_slow_and_reclaims_after_three_calm_runs() -> None:
    m, user = Ensure(baselines={"f": 1.0}), Alloc(1.0, 256)
    m.observe("f", user, obs(0.99, 100, user, exec_s=1.2))  # > 1.1x the baseline
    a = m.decide("f", user)
    assert a == Alloc(2.0, 256)  # CPU only, memory stays the user's
    for i in range(2):
        m.observe("f", user, obs(0.5, 100, a, exec_s=0.8))  # calm: fast and < 70% CPU
        assert m.decide("f", user) == a, i
    m.observe("f", user, obs(0.5, 100, a, exec_s=0.8))
    assert m.decide("f", user) == Alloc(1.0, 256)
    m.observe("f", user, obs(0.9, 100, user, exec_s=1.05))  # within 1.1x, busy: no change
    assert m.decide("f", user) == user


def test_ensure_calm_count_resets_on_slow_run() -> None:
    m, user = Ensure(baselines={"f": 1.0}), Alloc(2.0, 512)
    m.observe("f", user, obs(0.3, 50, user, exec_s=0.5))
    m.observe("f", user, obs(0.3, 50, user, exec_s=0.5))
    m.observe("f", user, obs(0.3, 50, user, exec_s=2.0))  # slow: +1, calm back to 0
    a = m.decide("f", user)
    assert a.cpu_cores == 3.0
    for _ in range(3):
        m.observe("f", user, obs(0.3, 50, a, exec_s=0.5))
    assert m.decide("f", user).cpu_cores == 2.0


def test_ensure_learns_its_baseline_from_user_size_runs_without_one() -> None:
    m, user = Ensure(), Alloc(1.0, 256)
    m.observe("f", user, obs(0.9, 100, user, exec_s=1.0))  # first run sets the baseline
    assert m.decide("f", user) == user
    m.observe("f", user, obs(0.9, 100, user, exec_s=3.0))  # mean 2.0: 3.0 > 2.2
    assert m.decide("f", user).cpu_cores == 2.0
    m.observe("g", user, obs(0.9, 100, user, outcome="failure"))  # failures are ignored
    assert m.baseline("g") is None


def test_vpa_waits_three_runs_then_p90_and_max_with_margin() -> None:
    m, user = Vpa(), Alloc(2.0, 512)
    for cpu, mem in [(0.5, 100.0), (0.9, 120.0)]:
        m.observe("f", user, obs(cpu, mem, user))
        assert m.decide("f", user) == user
    m.observe("f", user, obs(0.95, 110.0, user))
    # p90 of (0.5, 0.9, 0.95) = 0.94 x 1.15 = 1.08 -> 2 cores; max 120 x 1.15 = 138 -> 192 MB
    assert m.decide("f", user) == Alloc(2.0, 192)
    m.observe("f", user, obs(0.1, 10.0, Alloc(2.0, 192), outcome="oom"))  # records 1.2 x 192
    assert m.decide("f", user).mem_mb == pytest.approx(G.mem_ceil(192 * 1.2 * 1.15))
    small = Vpa()
    for _ in range(3):
        small.observe("s", user, obs(0.01, 5.0, user))
    assert small.decide("s", user) == Alloc(1.0, 64)  # clamped to one unit


def test_vpa_clamps_to_grid_max() -> None:
    m, user = Vpa(), Alloc(2.0, 512)
    for _ in range(3):
        m.observe("f", user, obs(7.9, 600.0, user))
    assert m.decide("f", user) == Alloc(8.0, 512)


def test_kind_and_make() -> None:
    user = Alloc(1.0, 256)
    assert kind(user, user) == "user"
    assert kind(user, Alloc(1.0, 192)) == "harvested"
    assert kind(user, Alloc(2.0, 192)) == "accelerated"
    assert kind(Alloc(0.5, 128), Alloc(1.0, 128)) == "accelerated"
    assert isinstance(make("ensure", baselines={"f": 1.0}), Ensure)
    assert make("ensure", baselines={"f": 1.0}).baselines == {"f": 1.0}
    assert {make(n).name for n in ("greedy", "ensure", "vpa")} == {"greedy", "ensure", "vpa"}
