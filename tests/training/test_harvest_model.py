"""What the simulator adds to measure harvesting honestly: input sizes, unannounced memory spikes,
the node's give-back, the peaks a node's samples report, and the queueing an allocation causes.

One-function workloads built by hand (exact numbers), plus the generated presets (shapes).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from sim_helpers import run_allocs

from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.reward import RewardConfig, held_ratio, invocation_reward
from sidecar.core.safeguard import DECAY
from training.sim.cluster import (
    MEM_PEAK_AT,
    ClusterConfig,
    ClusterSim,
    cfs_cpu_time,
    cfs_work_within,
)
from training.sim.presets import get_preset
from training.sim.workload import Workload, WorkloadConfig

GRID = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
HOST = ClusterConfig(servers=1, cores=2.0, mem_mb=4096.0, cpu_overcommit=4.0)
HARD = replace(HOST, oom_hold=False)
"""The reference's hard memory limit: no OOM hold."""


def _workload(
    d: list[float],
    ws: list[float],
    *,
    arrival: list[float] | None = None,
    user_cores: float = 1.0,
    user_mem: int = 4,
    phi: float = 1.0,
    p: float = 1.0,
    worker_mb: float = 0.0,
    spike: list[bool] | None = None,
    inputs: list[float] | None = None,
    cold_s: float = 0.5,
) -> Workload:
    """Invocations of one function, 100 s apart unless ``arrival`` says otherwise, no noise."""
    n = len(d)
    return Workload(
        n_functions=1,
        user_cpu=np.array([round(user_cores / GRID.cpu_unit_cores)]),
        user_mem=np.array([user_mem]),
        parallelism=np.array([p]),
        cpu_frac=np.array([phi]),
        mem_pressure=np.zeros(1),
        worker_mb=np.array([worker_mb]),
        arrival_s=np.asarray(arrival if arrival is not None else np.arange(n) * 100.0, float),
        fn=np.zeros(n, dtype=np.int64),
        duration_s=np.asarray(d, float),
        working_set_mb=np.asarray(ws, float),
        noise=np.ones(n),
        cold_start_s=np.full(n, cold_s),
        input_size=np.asarray(inputs if inputs is not None else np.ones(n), float),
        spike=np.asarray(spike if spike is not None else np.zeros(n), bool),
    )


def _run(wl: Workload, allocs: list[Alloc], cluster: ClusterConfig = HOST) -> ClusterSim:
    return run_allocs(wl, allocs, cluster, GRID)


# ------------------------------------------------------------------------------------ workload
@pytest.fixture(scope="module")
def paper():
    p = get_preset("paper")
    return p, p.build(1)


def test_inputs_move_with_duration_and_memory_but_predict_them_imperfectly(paper):
    _, wl = paper
    assert np.all(wl.input_size > 0) and np.all(np.isfinite(wl.input_size))

    def spearman(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])

    rho_d, rho_m = [], []
    for f in np.flatnonzero(np.bincount(wl.fn) >= 200)[:40]:
        sel = (wl.fn == f) & ~wl.spike
        x = wl.input_size[sel]
        rho_d.append(spearman(x, wl.duration_s[sel]))
        if np.ptp(wl.working_set_mb[sel]) > 1.0:
            rho_m.append(spearman(x, wl.working_set_mb[sel]))
        # function-specific units: a span of 2.5-12x between its small and large inputs (noise
        # aside), not one scale for every function
        lo, hi = np.percentile(x, [5, 95])
        assert 1.5 < hi / lo < 40.0
    assert 0.7 < np.median(rho_d) < 0.995  # moves with its duration, but not exactly
    assert 0.7 < np.median(rho_m) < 0.995
    scales = [np.median(wl.input_size[wl.fn == f]) for f in range(50)]
    assert max(scales) / min(scales) > 100.0


def test_some_functions_spike_every_kth_call_without_a_larger_input(paper):
    p, wl = paper
    cfg = p.workload
    spiky = np.unique(wl.fn[wl.spike])
    busy = np.bincount(wl.fn, minlength=wl.n_functions) >= cfg.spike_every_max  # k calls seen
    share = np.isin(np.flatnonzero(busy), spiky).mean()
    assert 0.5 * cfg.spike_share < share < 2.0 * cfg.spike_share
    user_mb = wl.user_mem[wl.fn] * p.grid.mem_unit_mb
    assert np.all(wl.working_set_mb <= user_mb + 1e-9)  # Fixed never OOMs, spikes included
    for f in spiky[:20]:
        calls = np.flatnonzero(wl.fn == f)
        hits = np.flatnonzero(wl.spike[calls])
        gaps = np.diff(hits)
        if len(gaps):  # every k-th call
            assert len(set(gaps.tolist())) == 1
            assert cfg.spike_every_min <= gaps[0] <= cfg.spike_every_max
        usual = np.median(wl.working_set_mb[calls[~wl.spike[calls]]] - wl.worker_mb[f])
        big = wl.working_set_mb[calls[hits]] - wl.worker_mb[f]
        assert np.all(big >= np.minimum(2.0 * usual, user_mb[calls[hits]] - wl.worker_mb[f]))
    # the input says nothing about a spike: spiky calls' inputs are their function's usual ones
    for f in spiky[:20]:
        calls = wl.fn == f
        if wl.spike[calls].sum() >= 5:
            ratio = np.median(wl.input_size[calls & wl.spike]) / np.median(wl.input_size[calls])
            assert 0.3 < ratio < 3.0


def test_inputs_and_spikes_leave_every_other_draw_of_a_seed_as_it_was():
    p = get_preset("small")
    a = p.build(3)
    b = replace(p, workload=WorkloadConfig(spike_share=0.0, input_noise_sd=0.0)).build(3)
    for name in ("arrival_s", "fn", "duration_s", "noise", "cold_start_s", "user_cpu", "user_mem"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    same = ~a.spike
    np.testing.assert_array_equal(a.working_set_mb[same], b.working_set_mb[same])
    assert a.spike.any() and not b.spike.any()


def test_a_scaled_workload_is_the_same_invocations_arriving_faster():
    wl = get_preset("sample").build(1)
    fast = wl.scaled(2.0)
    np.testing.assert_allclose(fast.arrival_s, wl.arrival_s / 2.0)
    np.testing.assert_array_equal(fast.duration_s, wl.duration_s)
    np.testing.assert_array_equal(fast.input_size, wl.input_size)
    with pytest.raises(ValueError):
        wl.scaled(0.0)


# ------------------------------------------------------------------------------------ give-back
def test_a_throttled_cpu_harvest_runs_one_tick_at_its_quota_then_at_the_users():
    # 2 threads, 1.2 core-seconds of work, user 1 core: harvested to 0.5 core it is throttled
    d, p, pen = 0.6, 2.0, HOST.throttle_penalty_multithread
    wl = _workload([d, d], [40.0, 40.0], user_cores=1.0, p=p)
    sim = _run(wl, [Alloc(4, 4), Alloc(2, 4)])
    r = sim.results
    work = r.cpu_s[1]
    assert r.exec_s[0] == pytest.approx(d)  # the user's size
    done = cfs_work_within(0.1, 0.5, p, 0.1, pen)
    assert done == pytest.approx(0.05)  # one period's quota of 0.5 core
    expect = 0.1 + cfs_cpu_time(work - done, 1.0, p, 0.1, pen)
    assert r.exec_s[1] == pytest.approx(expect) and r.give_backs[1] == 1
    static = _run(wl, [Alloc(4, 4), Alloc(2, 4)], replace(HOST, give_back=False)).results
    assert static.exec_s[1] == pytest.approx(cfs_cpu_time(work, 0.5, p, 0.1, pen))
    assert d < r.exec_s[1] < 1.2 * d < static.exec_s[1]  # the give-back saves most of it
    # what it held: 0.5 core for the tick, the user's core after; and the samples saw 1 core
    assert r.cpu_held[1] == pytest.approx(0.5 * 0.1 + 1.0 * (r.exec_s[1] - 0.1))
    assert r.cpu_peak[1] == pytest.approx(1.0) and static.cpu_peak[1] == pytest.approx(0.5)
    assert static.give_backs[1] == 0


def test_a_cpu_harvest_that_fits_the_quota_keeps_it():
    wl = _workload([2.0, 2.0], [40.0, 40.0], user_cores=2.0, p=0.6)
    r = _run(wl, [Alloc(8, 4), Alloc(4, 4)]).results  # 1 core for a 0.6-core function
    assert r.exec_s[1] == pytest.approx(2.0) and r.give_backs[1] == 0
    assert r.cpu_held[1] == pytest.approx(1.0 * 2.0)
    assert r.cpu_peak[1] == pytest.approx(0.6)


def test_memory_growing_slowly_past_a_harvested_limit_is_given_back_not_killed():
    # 200 MB working set on a 128 MB limit: growth from the worker (0 MB) over half of a 10 s
    # run, 40 MB/s; usage crosses 0.9 x 128 at 2.88 s, the give-back lands a tick later
    # (2.98 s), before the limit is reached (3.2 s)
    wl = _workload([10.0, 10.0], [200.0, 200.0], phi=0.5, user_mem=4)
    r = _run(wl, [Alloc(4, 4), Alloc(4, 2)]).results
    assert not r.failed[1] and r.give_backs[1] == 1
    assert r.exec_s[1] == pytest.approx(10.0)  # nothing slowed it
    slope = 200.0 / (MEM_PEAK_AT * 10.0)
    back = 0.9 * 128.0 / slope + 0.1
    assert r.mem_held[1] == pytest.approx(128.0 * back + 256.0 * (10.0 - back))
    assert r.mem_peak[1] == 200.0


def test_memory_growing_within_a_tick_past_a_harvested_limit_is_killed_where_it_reaches_it():
    wl = _workload([0.2, 0.2], [200.0, 200.0], phi=0.5, user_mem=4, cold_s=0.4)
    r = _run(wl, [Alloc(4, 4), Alloc(4, 2)], HARD).results
    assert r.failed[1] and r.give_backs[1] == 0
    kill = MEM_PEAK_AT * 128.0 / 200.0  # share of the run when the limit is reached
    base = r.baseline_s[1]
    assert r.exec_s[1] == pytest.approx(kill * 0.2 + 0.4 + base)  # killed, cold start, rerun
    assert r.mem_peak[1] == 128.0  # the node sees the limit it was killed at


def test_a_spike_is_allocated_at_once_and_no_usage_give_back_saves_it():
    wl = _workload([10.0, 10.0], [200.0, 200.0], phi=0.5, user_mem=4, spike=[False, True])
    r = _run(wl, [Alloc(4, 4), Alloc(4, 2)], HARD).results
    assert r.failed[1] and r.give_backs[1] == 0
    assert r.exec_s[1] == pytest.approx(MEM_PEAK_AT * 10.0 + 0.5 + 10.0)


@pytest.mark.parametrize("spike", [False, True])
def test_with_the_oom_hold_a_run_past_its_harvested_limit_waits_a_tick_instead_of_dying(spike):
    """``oom_hold`` (the node's default ``v1_memory_harvest = "hold"``): the two runs above that
    the hard limit kills wait one tick where they reach the limit, then run on at the user's
    memory."""
    d = 10.0 if spike else 0.2
    wl = _workload([d, d], [200.0, 200.0], phi=0.5, user_mem=4, spike=[False, spike], cold_s=0.4)
    r = _run(wl, [Alloc(4, 4), Alloc(4, 2)]).results  # the default, as on a node
    assert not r.failed[1] and r.give_backs[1] == 1
    assert r.exec_s[1] == pytest.approx(d + 0.1)  # its run plus the tick it waited
    reach = MEM_PEAK_AT * (1.0 if spike else 128.0 / 200.0) * d
    back = reach + 0.1
    assert r.mem_held[1] == pytest.approx(128.0 * back + 256.0 * (d + 0.1 - back))
    assert r.mem_peak[1] == 200.0
    # a limit above the working set is never reached; at the user's size nothing is held
    r = _run(wl, [Alloc(4, 4), Alloc(4, 4)]).results
    assert not r.failed[1] and r.give_backs[1] == 0 and r.exec_s[1] == pytest.approx(d)


def test_without_the_give_back_every_run_above_its_limit_is_killed():
    wl = _workload([10.0, 10.0], [200.0, 200.0], phi=0.5, user_mem=4)
    r = _run(wl, [Alloc(4, 4), Alloc(4, 2)], replace(HOST, give_back=False)).results
    assert r.failed[1] and r.give_backs[1] == 0


# ------------------------------------------------------------------------------------ the peaks
def test_a_burst_within_its_quota_reports_its_rate_as_a_nodes_samples_would():
    # 40 ms of 2-thread work (80 ms of CPU) at 1 core fits one period's quota: it runs at 2 cores
    wl = _workload([0.04, 0.04, 5.0], [40.0] * 3, user_cores=1.0, p=2.0)
    r = _run(wl, [Alloc(4, 4), Alloc(4, 4), Alloc(4, 4)]).results
    assert r.exec_s[1] == pytest.approx(0.04)
    # shorter than a tick: its work over the whole invocation (the node's end-of-run average)
    assert r.cpu_peak[1] == pytest.approx(r.cpu_s[1] / 0.04)
    assert r.cpu_peak[1] > 1.0  # above its quota, as it really ran
    assert r.cpu_peak[2] == pytest.approx(1.0)  # a long run at 1 core is throttled at 1 core


# ------------------------------------------------------------------------------------ the guard
def test_the_guard_gets_the_input_and_the_memory_a_container_holds_at_start():
    wl = _workload(
        [1.0, 1.0, 1.0],
        [40.0, 100.0, 60.0],
        arrival=[0.0, 50.0, 5000.0],  # the third comes after the keep-alive: cold again
        worker_mb=30.0,
        inputs=[10.0, 20.0, 30.0],
    )
    sim = ClusterSim(wl, HOST, GRID)
    seen = []
    while (req := sim.next_request()) is not None:
        again = sim.decider.guard(req.user, req.guard_state, 30.0, req.input_size)
        cold = sim.decider.guard(req.user, req.guard_state, 0.0, req.input_size)
        seen.append((req.input_size, req.guard == again, req.guard == cold))
        sim.apply(req.user)
    assert [s[0] for s in seen] == [10.0, 20.0, 30.0]
    assert seen[1][1]  # warm: the worker's 30 MB
    assert seen[2][2]  # cold: nothing yet
    gs = sim.guards[0]
    # the largest growth is the warm run's 100 - 30 MB (a cold start would count the worker)
    assert gs.input_growth_mb == pytest.approx(70.0 * DECAY)
    assert gs.input_max == pytest.approx(30.0) and sim.stats[0].inputs == 3


def test_the_node_state_counts_the_cores_allocated_as_a_nodes_engine_does():
    # A mostly waiting function (10% CPU-bound) holds its user's core while it uses 0.1 of it:
    # a node's engine counts free cores as its capacity minus the running allocations, and a
    # policy trained here must see what it will see there.
    wl = _workload([10.0, 10.0], [40.0, 40.0], arrival=[0.0, 1.0], phi=0.1, cold_s=0.0)
    sim = ClusterSim(wl, HOST, GRID)
    free = []
    while (req := sim.next_request()) is not None:
        free.append(sim.node_state().free_cores)
        sim.apply(req.user)
    sim.run_to_end()
    assert free == pytest.approx([2.0, 1.0])  # 2 cores less the first's 1 core allocated


# ------------------------------------------------------------------------------------ queueing
def test_the_queueing_an_over_allocation_causes_is_charged_to_it():
    # One 512 MB server. A (user 256 MB) takes 512 MB for 10 s; B arrives at 1 s and waits 9 s.
    one = ClusterConfig(servers=1, cores=8.0, mem_mb=512.0, cpu_overcommit=1.0)
    wl = _workload([10.0, 10.0], [40.0, 40.0], arrival=[0.0, 1.0], cold_s=0.0)
    sim = _run(wl, [Alloc(4, 8), Alloc(4, 4)], one)
    r = sim.results
    assert r.queue_s[1] == pytest.approx(9.0)
    # 9 s of one waiting invocation, per MB held: 256 MB above the user's size of the 512 held
    assert r.caused_s[0] == pytest.approx(0.5 * 256.0 * 9.0 / 512.0)
    assert r.caused_s[1] == 0.0  # nothing waited while B ran
    expect = invocation_reward(
        r.exec_s[0],
        r.baseline_s[0],
        cpu_held=held_ratio(r.cpu_held[0], 1.0, r.baseline_s[0]),
        mem_held=held_ratio(r.mem_held[0], 256.0, r.baseline_s[0]),
        caused_queue_s=r.caused_s[0],
    )
    assert r.reward[0] == pytest.approx(expect) and r.reward[0] < -0.2
    # B's own wait is B's: 9 s of queueing on a 10 s baseline
    assert r.reward[1] == pytest.approx(invocation_reward(10.0, 10.0, queue_s=9.0))


def test_a_harvest_while_others_wait_earns_a_credit_and_fixed_causes_nothing():
    p = get_preset("small")
    tight = replace(p.cluster, servers=1, mem_mb=p.grid.max_mb * 2, cpu_overcommit=1.0)
    wl = p.build(3)
    fixed = ClusterSim(wl, tight, p.grid)
    while (req := fixed.next_request()) is not None:
        fixed.apply(req.user)
    fixed.run_to_end()
    assert (fixed.results.queue_s > 0).mean() > 0.3  # the queue is long
    assert np.all(fixed.results.caused_s == 0.0)
    small = ClusterSim(wl, tight, p.grid)
    while (req := small.next_request()) is not None:
        small.apply(Alloc(req.guard.cpu_lo, req.guard.mem_lo))
    small.run_to_end()
    r = small.results
    below = r.mem < wl.user_mem[wl.fn]
    assert np.all(r.caused_s[below & (r.cpu <= wl.user_cpu[wl.fn])] <= 0.0)
    assert r.caused_s.min() < 0.0
    assert math.isfinite(r.reward.sum()) and r.done.all()


def test_the_efficiency_term_uses_the_resources_held_relative_to_the_users_size():
    cfg = RewardConfig()
    wl = _workload([2.0] * 3, [40.0] * 3, user_cores=2.0, p=0.5, user_mem=4, cold_s=0.0)
    # the user's size; half its memory and 3/8 of its CPU; then 1/4 of its CPU, which the
    # function's 0.5 cores use up: the node gives the CPU back after a tick
    r = _run(wl, [Alloc(8, 4), Alloc(3, 2), Alloc(2, 2)]).results
    assert r.reward[0] == pytest.approx(0.0)
    assert np.allclose(r.exec_s, 2.0) and r.give_backs.tolist() == [0, 0, 1]
    bonus = cfg.efficiency_weight * 0.5 * ((1.0 - 0.375) + (1.0 - 0.5))
    assert r.reward[1] == pytest.approx(bonus)
    held = (0.5 * 0.1 + 2.0 * 1.9) / (2.0 * 2.0)
    assert r.reward[2] == pytest.approx(cfg.efficiency_weight * 0.5 * ((1.0 - held) + 0.5))
    assert r.reward[2] < r.reward[1]
