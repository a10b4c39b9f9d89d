"""The engine's decisions, give-back, OOM and boundary rules: pure, no I/O."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest
from sidecar_helpers import GRID, MB, ref, sample

from sidecar.cgroups import Usage
from sidecar.config import ActuationConfig, BoundaryConfig, HarvestPeriod
from sidecar.core.features import FEATURES, N_FEATURES, expand_rows
from sidecar.core.grid import Alloc
from sidecar.core.policy import MLPScorer, RuleScorer, fallback_scorer, masked_log_softmax
from sidecar.core.record import check_batch
from sidecar.core.reward import invocation_reward
from sidecar.engine import (
    USER_TARGET,
    Busy,
    Engine,
    EngineError,
    GiveBack,
    InferredEnd,
    InferredStart,
    OomKill,
    Target,
    UnknownContainer,
    UnknownInvocation,
    effective,
    held_seconds,
    plan_target,
)
from sidecar.runtimes.base import UserSize
from sidecar.spool import encode
from training.baselines import Learned
from training.sim.cluster import ClusterConfig, ClusterSim
from training.sim.workload import Workload


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


COL = {f.name: i for i, f in enumerate(FEATURES)}


class HarvestScorer:
    """Prefers the smallest candidate (what a harvesting model would do)."""

    def scores(self, rows: np.ndarray) -> np.ndarray:
        return -(rows[:, COL["cand_cpu"]] + rows[:, COL["cand_mem"]])


class NanScorer:
    def scores(self, rows: np.ndarray) -> np.ndarray:
        return np.full(len(rows), np.nan, np.float32)


def make_engine(scorer=None, clock=None, host_cores=2.0, host_mem_mb=4096.0, **kw) -> Engine:
    sc = scorer or HarvestScorer()
    return Engine(
        GRID,
        node_id="n1",
        host_cores=host_cores,
        host_mem_mb=host_mem_mb,
        scorer=lambda: (sc, "test"),
        clock=clock or Clock(),
        wall=lambda: 1e9,
        **kw,
    )


def usage(cpu_s: float = 0.0, mem_mb: float = 10.0, peak_mb: float = -1) -> Usage:
    return Usage(
        0.0, cpu_s, 0, 0.0, int(mem_mb * MB), int(peak_mb * MB) if peak_mb >= 0 else -1, 0, None
    )


def run_one(
    eng: Engine,
    clock: Clock,
    cid: str = "fn@1",
    cpu_peak: float = 0.3,
    mem_mb: float = 40.0,
    dur: float = 1.0,
    outcome: str = "success",
):
    inv = eng.start(cid, usage=usage(0.0, mem_mb))
    clock.t += dur
    ended = eng.end(inv.id, outcome, usage=usage(cpu_peak * dur, mem_mb, mem_mb))
    return inv, ended


def test_first_invocation_is_a_safeguard_run_at_the_exact_user_size() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=1.3, mem_mb=300))  # off the grid: exact values restored
    inv = eng.start("fn@1", usage=usage())
    assert inv.guard.reason == "cpu=first,mem=first"
    assert inv.alloc == GRID.nearest(1.3, 300) and inv.target == USER_TARGET
    assert effective(inv.user, inv.target) == (1.3, 300 * MB)
    assert inv.trace["kind"] == "user"
    clock.t += 2.0
    ended = eng.end(inv.id, usage=usage(0.6, 50, 60))
    # no baseline existed before this run: no reward, no RFET (documented), baseline now set
    assert ended.reward is None and ended.rfet is None
    assert eng.stats["fn"].baseline_duration_s == pytest.approx(2.0)
    assert ended.invocation.cpu_peak_cores == pytest.approx(0.3)
    assert ended.invocation.mem_peak_bytes == 60 * MB


def test_second_invocation_harvests_within_the_safeguard_range_and_gets_a_reward() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=40)
    inv = eng.start("fn@1", usage=usage(0, 40))
    assert inv.guard.cpu_mode == "harvest" and inv.guard.mem_mode == "harvest"
    # recent peak 0.3 cores -> lo = ceil(0.3/0.25 + 1) = 3 units; 40 MB + 16 MB floor -> 1 unit,
    # peak rule: ceil(40/64 + 0.25) = 1 unit (the reference's whole unit: 2)
    assert inv.alloc == Alloc(3, 1)
    assert inv.target.cpu_cores == pytest.approx(0.75) and inv.target.mem_limit_bytes == 64 * MB
    assert inv.target.cpu_weight == round(100 * 0.75 / 2.0)
    assert inv.trace["kind"] == "harvested"
    clock.t += 1.5
    ended = eng.end(inv.id, usage=usage(0.3 * 1.5, 40, 41))
    assert ended.rfet == pytest.approx(1.5) and ended.reward is not None and ended.reward < 0
    rec = ended.record
    assert rec["v"] == 1 and rec["action"] == GRID.index(inv.alloc) and rec["outcome"] == "success"
    assert (
        np.unpackbits(np.frombuffer(rec["mask"], np.uint8))[: GRID.n].astype(bool).tolist()
        == inv.guard.mask.tolist()
    )
    assert msgpack.unpackb(encode(rec))["reward"] == pytest.approx(ended.reward)
    # what the trainer reads: it validates, and counts the reward
    assert check_batch((msgpack.unpackb(encode(rec), use_list=False),), "n1") == 1


def _sequential_workload(n: int, parallelism: float) -> Workload:
    """One function (user size 1 core, 256 MB), invocations 100 s apart: each ends before the
    next arrives, so the simulator's node is as idle at every decision as the engine's host. An
    occasional large working set OOM-kills a harvested run."""
    rng = np.random.default_rng(0)
    return Workload(
        n_functions=1,
        user_cpu=np.array([4]),
        user_mem=np.array([4]),
        parallelism=np.array([parallelism]),
        cpu_frac=np.array([0.8]),
        mem_pressure=np.zeros(1),
        worker_mb=np.zeros(1),
        arrival_s=np.arange(n) * 100.0,
        fn=np.zeros(n, dtype=np.int64),
        duration_s=rng.uniform(0.2, 3.0, n),
        working_set_mb=rng.choice([30.0, 45.0, 60.0, 100.0, 200.0], n),  # whole MB: exact bytes
        noise=np.ones(n),
        cold_start_s=np.full(n, 0.5),
        input_size=rng.uniform(10.0, 100.0, n),
        spike=np.zeros(n, dtype=bool),
    )


@pytest.mark.parametrize(
    ("parallelism", "scorer", "kind"),
    [
        (0.3, MLPScorer.random(N_FEATURES, seed=3), "harvested"),
        (1.5, MLPScorer.random(N_FEATURES, seed=2), "accelerated"),
        (0.3, fallback_scorer("smallest"), "oom"),
    ],
)
def test_engine_decides_like_the_simulators_learned_manager(parallelism, scorer, kind) -> None:
    """The simulator runs a workload under ``Learned``; the engine replays the same arrivals,
    inputs and outcomes (a sample at the peak, the CPU work, OOM kills, durations). Same choice
    and probabilities at every decision."""
    # the OOM path needs the reference's hard limit: with the hold (the default) nothing is killed
    hard = kind == "oom"
    sim = ClusterSim(
        _sequential_workload(40, parallelism),
        ClusterConfig(1, 2.0, 2048.0, oom_hold=not hard),
        GRID,
    )
    learned = Learned(scorer)
    learned.reset(sim)
    eng = make_engine(scorer=scorer, host_cores=sim.total_cores, host_mem_mb=sim.total_mem)
    eng.add_container(ref(cpu=1.0, mem_mb=256))
    log, running, seen = sim.log, None, set()
    while (req := sim.next_request()) is not None:
        if running is not None:  # the simulator has finished it: the engine ends it alike
            inv, i = running
            end = inv.start_s + log.cold_s[i] + log.exec_s[i]
            eng.on_sample(sample("fn@1", inv.start_s + 0.1, cpu=log.cpu_peak[i], mem_mb=0.0))
            u = Usage(0.0, log.cpu_s[i], 0, 0.0, 0, int(log.mem_peak[i] * MB), 0, None)
            outcome = "oom" if log.failed[i] else "success"
            seen.add(outcome)
            eng.end(inv.id, outcome, duration_s=log.exec_s[i], usage=u, now_s=end)
        d = learned.decision(sim, req)
        inv = eng.start("fn@1", usage=usage(0.0, 0.0), input_size=req.input_size, now_s=req.now_s)
        assert inv.action == d.action and inv.logp == pytest.approx(d.logp, abs=1e-9), req.inv
        np.testing.assert_array_equal(inv.guard.mask, d.guard.mask)
        np.testing.assert_allclose(inv.ctx, d.obs.context, rtol=1e-6)
        rows = expand_rows(inv.ctx, inv.cpu_block, inv.mem_block)
        np.testing.assert_allclose(
            np.exp(masked_log_softmax(scorer.scores(rows), inv.guard.mask)),
            np.exp(masked_log_softmax(scorer.scores(d.obs.rows()), d.guard.mask)),
            atol=1e-6,
        )
        seen.add(inv.trace["kind"])
        sim.apply(learned.decide(sim, req))
        running = inv, req.inv
    assert {"user", kind} <= seen  # safeguard runs, and the path this case is about


def test_node_state_counts_running_allocations_only() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref("a", cpu=1.0, mem_mb=256))
    eng.add_container(ref("b", cpu=0.5, mem_mb=128))
    assert eng.node_state().free_cores == 2.0
    eng.start("a", usage=usage())
    ns = eng.node_state(pending=4)
    assert ns.free_cores == pytest.approx(1.0) and ns.free_mem_mb == pytest.approx(4096 - 256)
    assert ns.pending == 4


def test_give_back_cpu_and_memory_once_each() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=60)  # harvested to 128 MB: 60 + a quarter unit
    inv = eng.start("fn@1", usage=usage(0, 40))
    assert inv.target.cpu_cores == 0.75
    clock.t += 0.1
    assert eng.on_sample(sample("fn@1", clock.t, cpu=0.5, mem_mb=50)) == []  # 0.5 < 0.9 * 0.75
    clock.t += 0.1
    (gb,) = eng.on_sample(sample("fn@1", clock.t, cpu=0.7, mem_mb=50))
    assert isinstance(gb, GiveBack) and gb.resources == ("cpu",)
    assert gb.target.cpu_cores is None and gb.target.cpu_weight is None
    assert gb.target.mem_limit_bytes == 128 * MB  # memory still harvested
    clock.t += 0.1
    assert eng.on_sample(sample("fn@1", clock.t, cpu=1.0, mem_mb=50)) == []  # cpu at user now
    clock.t += 0.1
    (gb2,) = eng.on_sample(sample("fn@1", clock.t, cpu=0.1, mem_mb=120))  # 120 >= 0.9 * 128
    assert gb2.resources == ("memory",) and gb2.target == USER_TARGET
    assert [g["resources"] for g in inv.trace["give_backs"]] == [["cpu"], ["memory"]]
    clock.t += 0.1
    ended = eng.end(inv.id, usage=usage(0.5, 120, 125))
    assert ended.record["give_backs"] == ["cpu", "memory"]
    # the peak reached >= 0.9 x what was given: the next run is pinned ("rising")
    nxt = eng.start("fn@1", usage=usage(0, 40))
    assert nxt.guard.reason == "cpu=rising,mem=rising" and nxt.target == USER_TARGET


def _counters(s, periods: int, throttled: int):
    """A sample (or usage) with cumulative CFS counters, as a watched container's tick reads."""
    return s._replace(nr_periods=periods, nr_throttled=throttled)


def test_throttle_give_back_raises_a_harvested_quota_in_one_step() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=60)  # harvested to 128 MB: 60 + a quarter unit
    inv = eng.start("fn@1", usage=_counters(usage(0, 40), 100, 5))
    assert inv.cpu_harvested and inv.target.cpu_cores == 0.75
    clock.t += 0.1
    quiet = sample("fn@1", clock.t, cpu=0.3, mem_mb=50)
    assert eng.on_sample(_counters(quiet, 101, 5)) == []  # a period, not throttled
    clock.t += 0.1
    assert eng.on_sample(_counters(quiet, 101, 5)) == []  # no period ended: no verdict
    clock.t += 0.1
    assert eng.on_sample(_counters(quiet, 106, 6)) == []  # 1 of 5: not more than the 0.25 target
    clock.t += 0.1
    # both periods since the last look were throttled, though the window's mean (0.3 core) is
    # far from the 0.75-core quota: a burst that hits the quota between samples
    (gb,) = eng.on_sample(_counters(quiet, 108, 8))
    assert gb.resources == ("cpu",) and gb.reasons == ("throttled",)
    assert gb.target.cpu_cores is None and gb.target.mem_limit_bytes == 128 * MB
    assert not inv.cpu_harvested
    (entry,) = inv.trace["give_backs"]
    assert entry["reason"] == "throttled" and entry["throttled_share"] == 1.0
    assert entry["new_cpu_cores"] == 2.0 and entry["new_mem_bytes"] == 128 * MB  # the user's CPU
    assert entry["tick"] == 4 and entry["resources"] == ["cpu"]
    clock.t += 0.1
    assert eng.on_sample(_counters(quiet, 110, 10)) == []  # given back once
    ended = eng.end(inv.id, usage=_counters(usage(0.5, 50, 60), 110, 10))
    assert ended.invocation.trace["throttled_share"] == 0.5  # 5 of the invocation's 10 periods
    assert ended.record["give_backs"] == ["cpu"]


def test_throttle_and_usage_give_backs_in_one_tick_and_the_target_bounds() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=40)
    inv = eng.start("fn@1", usage=_counters(usage(0, 40), 0, 0))
    clock.t += 0.1
    (gb,) = eng.on_sample(_counters(sample("fn@1", clock.t, cpu=0.75, mem_mb=120), 1, 1))
    # CPU over the target and at its quota: the throttle reason wins; memory by its usage
    assert gb.resources == ("cpu", "memory") and gb.reasons == ("throttled", "usage")
    assert gb.target == USER_TARGET
    assert [(g["resources"], g["reason"]) for g in inv.trace["give_backs"]] == [
        (["cpu"], "throttled"),
        (["memory"], "usage"),
    ]
    eng.end(inv.id, usage=usage(0.1, 40, 45))
    # throttle_target = 1 switches the throttle rule off; the usage rule still gives CPU back
    eng.act_cfg = ActuationConfig(throttle_target=1.0)
    run_one(eng, clock, cpu_peak=0.3, mem_mb=40)  # the last run's peaks pinned it ("rising")
    inv = eng.start("fn@1", usage=_counters(usage(0, 40), 0, 0))
    assert inv.cpu_harvested
    clock.t += 0.1
    assert eng.on_sample(_counters(sample("fn@1", clock.t, cpu=0.3, mem_mb=50), 4, 4)) == []
    clock.t += 0.1
    # (the remembered burst of the last harvested run keeps this harvest at a core or more)
    busy = 0.95 * inv.target.cpu_cores
    (gb,) = eng.on_sample(_counters(sample("fn@1", clock.t, cpu=busy, mem_mb=50), 8, 8))
    assert gb.reasons == ("usage",) and inv.trace["give_backs"][0]["throttled_share"] == 1.0


def test_no_give_back_for_user_sized_or_accelerated_runs() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=0.5, mem_mb=128))
    inv = eng.start("fn@1", usage=usage())
    clock.t += 0.2
    assert eng.on_sample(sample("fn@1", clock.t, cpu=0.5, mem_mb=127)) == []
    clock.t += 1
    eng.end(inv.id, usage=usage(0.5, 100, 120))
    inv2 = eng.start("fn@1", usage=usage(0, 20))  # under-provisioned -> accelerated
    assert inv2.guard.cpu_mode == "accelerate" and inv2.target.cpu_cores > 0.5
    assert inv2.trace["kind"] == "accelerated"
    clock.t += 0.2
    assert eng.on_sample(sample("fn@1", clock.t, cpu=0.75, mem_mb=150)) == []


def test_oom_during_an_invocation_makes_the_next_one_a_safeguard_run() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref())
    run_one(eng, clock)
    inv = eng.start("fn@1", usage=usage(0, 40))
    clock.t += 0.1
    (eff,) = eng.on_sample(sample("fn@1", clock.t, cpu=0.1, oom_delta=1))
    assert isinstance(eff, OomKill) and eff.invocation_id == inv.id
    ended = eng.end(inv.id, "success", usage=usage(0.1, 40))
    assert ended.outcome == "oom" and ended.reward is not None and ended.reward <= -5 + 1
    nxt = eng.start("fn@1", usage=usage())
    assert nxt.guard.reason == "cpu=failure,mem=failure" and nxt.target == USER_TARGET


def test_oom_between_invocations_and_failure_outcome_trip_the_safeguard() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref())
    run_one(eng, clock)
    (eff,) = eng.on_sample(sample("fn@1", clock.t, oom_delta=2))
    assert eff.kills == 2 and eff.invocation_id is None
    assert eng.start("fn@1", usage=usage()).guard.cpu_mode == "failure"
    eng.end(next(iter(eng.invocations)), usage=usage(0.3, 40, 40))
    inv = eng.start("fn@1", usage=usage(0, 40))
    assert inv.guard.cpu_mode == "harvest"
    assert eng.end(inv.id, "failure").outcome == "failure"
    assert eng.start("fn@1", usage=usage()).guard.cpu_mode == "failure"


def test_a_run_cut_short_by_shutdown_teaches_nothing_unless_a_task_was_killed() -> None:
    """The daemon's shutdown ends running invocations ``lost`` without learning from them: a cut
    run says nothing of the function's needs. A kill the kernel reported during it is still
    learned, and a run lost any other way (its container removed mid-run: a timeout's kill, say)
    still trips the safeguard, as a failure."""
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=60)
    harvested = eng.start("fn@1", usage=usage(0, 40))
    assert harvested.guard.mem_mode == "harvest"
    gs, stats = eng.guards["fn"], eng.stats["fn"]
    before = (dataclasses.asdict(gs), dataclasses.asdict(stats))
    clock.t += 0.3
    ended = eng.end(harvested.id, "lost", learn=False)
    assert ended.outcome == "lost" and ended.reward is None and ended.record
    assert (dataclasses.asdict(gs), dataclasses.asdict(stats)) == before
    nxt = eng.start("fn@1", usage=usage(0, 40))
    assert nxt.guard.reason == harvested.guard.reason and nxt.alloc == harvested.alloc
    clock.t += 0.1
    (kill,) = eng.on_sample(sample("fn@1", clock.t, cpu=0.1, oom_delta=1))
    assert isinstance(kill, OomKill) and kill.invocation_id == nxt.id
    assert eng.end(nxt.id, "lost", learn=False).outcome == "oom"
    assert gs.failures == 1
    assert eng.start("fn@1", usage=usage()).guard.reason == "cpu=failure,mem=failure"
    # a run lost without the daemon's doing is a failure to the safeguard, as before
    eng.add_container(ref("g@1", function="g", cpu=2.0, mem_mb=512))
    run_one(eng, clock, cid="g@1", cpu_peak=0.3, mem_mb=60)
    removed = eng.start("g@1", usage=usage(0, 40))
    assert eng.end(removed.id, "lost").outcome == "lost"
    assert eng.start("g@1", usage=usage()).guard.reason == "cpu=failure,mem=failure"


def test_every_function_gets_a_baseline_to_be_rewarded_against() -> None:
    """A calibrating run whose memory the floor lifts above the user's size (idle usage within
    the headroom of it) measures the function as closely as any run can, and sets the baseline;
    a zero-length run measures nothing, so the next run calibrates instead. Either had left the
    function without a baseline for good, every record after it without a reward."""
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=1.0, mem_mb=256))  # 4 units of 64 MB
    first = eng.start("fn@1", usage=usage(0, 250))  # 250 MB idle + 16 MB headroom: 5 units
    assert first.guard.calibrating and first.alloc.mem == first.user_alloc.mem + 1
    clock.t += 1.0
    eng.end(first.id, usage=usage(0.3, 250, 252))
    assert eng.stats["fn"].baseline_duration_s == pytest.approx(1.0)
    nxt = eng.start("fn@1", usage=usage(0, 250))
    clock.t += 1.0
    assert eng.end(nxt.id, usage=usage(0.3, 250, 252)).reward is not None
    # a zero-length run at the user's size: no baseline of 0, and the next run calibrates
    eng.add_container(ref("g@1", function="g", cpu=1.0, mem_mb=256))
    zero = eng.start("g@1", usage=usage(0, 40))
    eng.end(zero.id, duration_s=0.0, usage=usage(0.0, 40, 40))
    assert eng.stats["g"].baseline_runs == 0
    again = eng.start("g@1", usage=usage(0, 40))
    assert again.guard.reason == "cpu=first,mem=first"
    clock.t += 0.5
    eng.end(again.id, usage=usage(0.1, 40, 40))
    assert eng.stats["g"].baseline_duration_s == pytest.approx(0.5)
    later = eng.start("g@1", usage=usage(0, 40))
    clock.t += 0.5
    assert eng.end(later.id, usage=usage(0.1, 40, 40)).reward is not None


def test_a_kill_belongs_to_the_run_it_was_counted_in() -> None:
    """The kernel counts a kill as it picks its victim, before the invoker sees the run fail; the
    sampler's tick may only see it later. The end's own read of the counter classes the killed
    run, whatever the invoker reported, and a tick that sees the kill after the next run started
    does not charge that run with it: it would be recorded as an OOM at the user's size."""
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=60)
    killed = eng.start("fn@1", usage=usage(0, 40))
    clock.t += 0.05
    ended = eng.end(killed.id, "success", usage=usage(0.1, 60, 100)._replace(oom_kills=1))
    assert ended.outcome == "oom" and eng.guards["fn"].failures == 1
    assert ended.oom is not None and (ended.oom.kills, ended.oom.invocation_id) == (1, killed.id)
    nxt = eng.start("fn@1", usage=usage(0, 40)._replace(oom_kills=1))
    assert nxt.guard.reason == "cpu=failure,mem=failure"
    clock.t += 0.05
    # the same kill, which the end reported: not again
    assert eng.on_sample(sample("fn@1", clock.t, cpu=0.3, oom_delta=1)) == []
    clock.t += 1.0
    ended = eng.end(nxt.id, "success", usage=usage(0.3, 60, 60)._replace(oom_kills=1))
    assert ended.outcome == "success" and ended.reward is not None and ended.reward > -1
    assert eng.guards["fn"].failures == 1 and eng.guards["fn"].calibrate is None
    # a kill counted after a run started is that run's, by the tick or by its end
    third = eng.start("fn@1", usage=usage(0, 40)._replace(oom_kills=1))
    clock.t += 0.1
    (mine,) = eng.on_sample(sample("fn@1", clock.t, cpu=0.1, oom_delta=1)._replace(oom_kills=2))
    assert mine.invocation_id == third.id
    ended = eng.end(third.id, "success", usage=usage(0.1, 40)._replace(oom_kills=2))
    assert ended.outcome == "oom" and ended.oom is None  # the tick reported it


def test_a_kill_while_idle_read_first_by_the_next_start_still_charges_the_function() -> None:
    """A task killed between two runs (with ``restore_on_end = false`` an idle container keeps a
    harvested limit) whose kill the next start reads before any tick does: no end reported it,
    so the tick that sees it counts it once, as an idle kill, which charges the function's
    safeguard as any idle kill does, and not the run that started after it."""
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=60)
    nxt = eng.start("fn@1", usage=usage(0, 40)._replace(oom_kills=1))  # the kill counted before
    assert nxt.guard.cpu_mode == "harvest"
    clock.t += 0.1
    (kill,) = eng.on_sample(sample("fn@1", clock.t, cpu=0.1, oom_delta=1))
    assert (kill.kills, kill.invocation_id, kill.harvested) == (1, None, False)
    assert eng.guards["fn"].failures == 1
    assert eng.on_sample(sample("fn@1", clock.t + 0.1, cpu=0.1, oom_delta=1)) == []  # once
    clock.t += 1.0
    ended = eng.end(nxt.id, "success", usage=usage(0.3, 60, 60)._replace(oom_kills=1))
    assert ended.outcome == "success" and ended.oom is None
    assert eng.guards["fn"].failures == 1


@pytest.mark.parametrize("give_back", [False, True])
def test_a_failure_that_reached_its_harvested_hard_limit_counts_as_oom(give_back) -> None:
    """Under the OOM hold a syscall's allocation at the limit fails (EFAULT, ENOMEM) instead of
    waiting, and nothing is killed: a failure whose peak reached the harvested hard limit is the
    harvest's all the same, whether or not the memory was given back before it ended."""
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=60)  # harvested to 128 MB: 60 + a quarter unit
    inv = eng.start("fn@1", usage=usage(0, 40))
    wall = inv.target.mem_limit_bytes
    assert wall == 128 * MB
    if give_back:
        clock.t += 0.1
        (gb,) = eng.on_sample(sample("fn@1", clock.t, cpu=0.1, mem_mb=128, peak_mb=128))
        assert gb.resources == ("memory",) and gb.target.mem_limit_bytes is None
    clock.t += 0.1
    ended = eng.end(inv.id, "failure", usage=usage(0.1, 60, 128))
    assert ended.outcome == "oom"
    # the same failure below its limit is the function's own
    eng.add_container(ref("g@1", function="g", cpu=2.0, mem_mb=512))
    run_one(eng, clock, cid="g@1", cpu_peak=0.3, mem_mb=60)
    other = eng.start("g@1", usage=usage(0, 40))
    assert other.target.mem_limit_bytes == 128 * MB
    assert eng.end(other.id, "failure", usage=usage(0.1, 60, 100)).outcome == "failure"


def test_a_failing_model_never_stops_a_decision() -> None:
    clock = Clock()
    eng = make_engine(scorer=NanScorer(), clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=40)
    inv = eng.start("fn@1", usage=usage(0, 40))
    assert inv.fallback is not None and "non-finite" in inv.fallback and inv.model == "fallback"
    # the fallback rule picks the allowed candidate closest to the user's size
    assert inv.alloc == GRID.nearest(2.0, 512) and inv.guard.allows(inv.alloc)
    assert eng.consecutive_model_failures == 2 and eng.model_failures == 2


def test_memory_floor_from_current_usage() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=40)
    inv = eng.start("fn@1", usage=usage(0, 300))  # 300 MB in use now: floor 316 MB -> 5 units
    assert inv.alloc.mem >= 5 and GRID.mb(inv.alloc.mem) * MB >= 316 * MB


def test_reported_input_sizes_keep_the_memory_a_larger_input_needs() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    for size, peak in ((50.0, 62.0), (60.0, 72.0)):  # ~1 MB per input unit over 10 MB idle
        inv = eng.start("fn@1", usage=usage(0, 10), input_size=size)
        clock.t += 1.0
        eng.end(inv.id, "success", usage=usage(0.3, 10, peak))
    small = eng.start("fn@1", usage=usage(0, 10), input_size=40.0)
    clock.t += 1.0
    eng.end(small.id, "success", usage=usage(0.3, 10, 52))
    big = eng.start("fn@1", usage=usage(0, 10), input_size=250.0)
    # the peak rule alone allows ceil((72 + 16) / 64) = 2 units (128 MB), which a small input
    # gets; 10 + 1.04 x 250 + 16 MB needs 5 units (320 MB)
    assert GRID.mb(small.alloc.mem) == 128 and 320 <= GRID.mb(big.alloc.mem) <= 512
    assert big.trace["input_size"] == 250.0


def test_plan_target_v1_v2_and_no_memory_harvest() -> None:
    user = UserSize(2.0, 512 * MB, 200)
    ua = GRID.nearest(2.0, 512)
    act = ActuationConfig()
    t1 = plan_target(GRID, user, ua, Alloc(2, 2), 1, act)
    assert t1 == Target(0.5, 50, 128 * MB, None)
    t2 = plan_target(GRID, user, ua, Alloc(2, 2), 2, act)
    assert t2 == Target(0.5, 50, None, 128 * MB)  # v2: memory.max stays at the user's size
    assert effective(user, t2) == (0.5, 128 * MB)
    t3 = plan_target(GRID, UserSize(0.5, 128 * MB), GRID.nearest(0.5, 128), Alloc(4, 4), 2, act)
    assert t3 == Target(1.0, 200, 256 * MB, 256 * MB)
    periods = ActuationConfig(harvest_periods=[HarvestPeriod("burst", 200_000)])
    assert plan_target(GRID, user, ua, Alloc(2, 8), 1, periods, "burst").cpu_period_us == 200_000
    assert plan_target(GRID, user, ua, Alloc(2, 8), 1, periods, "other").cpu_period_us is None
    under = UserSize(0.5, 512 * MB)
    accel = plan_target(GRID, under, GRID.nearest(0.5, 512), Alloc(4, 8), 1, periods, "burst")
    assert accel.cpu_cores == 1.0 and accel.cpu_period_us is None  # only harvested quotas
    soft = ActuationConfig(v1_memory_harvest="soft")
    t4 = plan_target(GRID, user, ua, Alloc(2, 2), 1, soft)
    assert t4 == Target(0.5, 50, None, 128 * MB)  # v1 soft: the hard limit stays the user's
    assert effective(user, t4) == (0.5, 128 * MB)
    no_mem = ActuationConfig(harvest_memory=False, scale_weight=False)
    assert plan_target(GRID, user, ua, Alloc(2, 2), 1, no_mem) == Target(0.5, None, None, None)
    assert plan_target(GRID, user, ua, ua, 1, act) == USER_TARGET


def test_inferred_boundaries_from_cpu_activity() -> None:
    clock = Clock()
    eng = make_engine(
        clock=clock, boundaries=BoundaryConfig(infer=True, busy_cores=0.05, idle_ticks=3)
    )
    eng.add_container(ref())
    assert eng.on_sample(sample("fn@1", 1.0, cpu=0.01)) == []
    (st,) = eng.on_sample(sample("fn@1", 1.1, cpu=0.8))
    assert isinstance(st, InferredStart)
    inv = eng.start("fn@1", inferred=True, now_s=1.0)
    eng.note_inferred_start("fn@1", 1.1)
    assert eng.on_sample(sample("fn@1", 1.2, cpu=0.9)) == []
    assert eng.on_sample(sample("fn@1", 1.3, cpu=0.0)) == []
    assert eng.on_sample(sample("fn@1", 1.4, cpu=0.0)) == []
    (en,) = eng.on_sample(sample("fn@1", 1.5, cpu=0.0))
    assert (
        isinstance(en, InferredEnd)
        and en.invocation_id == inv.id
        and en.end_s == pytest.approx(1.2)
    )
    # a container reported by a hook is never inferred
    eng.end(inv.id, duration_s=0.2)
    eng.add_container(ref("h@1"))
    eng.end(eng.start("h@1").id)
    assert eng.on_sample(sample("h@1", 2.0, cpu=1.0)) == []


def test_errors_unknown_busy_bad_outcome() -> None:
    eng = make_engine()
    with pytest.raises(UnknownContainer):
        eng.start("nope")
    eng.add_container(ref())
    inv = eng.start("fn@1")
    with pytest.raises(Busy):
        eng.start("fn@1")
    with pytest.raises(EngineError):
        eng.end(inv.id, "exploded")
    with pytest.raises(UnknownInvocation):
        eng.end("nope")
    assert eng.remove_container("fn@1") is inv


def test_trace_is_a_bounded_ring_with_filters() -> None:
    clock = Clock()
    eng = make_engine(clock=clock, trace_size=5)
    eng.add_container(ref("a", function="fa"))
    eng.add_container(ref("b", function="fb"))
    for i in range(8):
        run_one(eng, clock, cid="a" if i % 2 else "b")
    assert len(eng.trace) == 5
    assert {e["function"] for e in eng.allocations(function="fa")} == {"fa"}
    assert {e["container"] for e in eng.allocations(container="b")} == {"b"}
    assert len(eng.allocations(limit=2)) == 2
    assert eng.allocations()[0]["outcome"] == "success"


def test_fallback_scorer_is_the_user_size_rule() -> None:
    assert isinstance(fallback_scorer(), RuleScorer)
    eng = make_engine(scorer=fallback_scorer())
    eng.add_container(ref(cpu=1.0, mem_mb=256))
    assert eng.start("fn@1").alloc == GRID.nearest(1.0, 256)
    assert not math.isnan(eng.invocations[next(iter(eng.invocations))].logp)


def test_a_failing_model_falls_back_to_the_configured_rule() -> None:
    clock = Clock()
    eng = make_engine(scorer=NanScorer(), clock=clock, fallback=fallback_scorer("smallest"))
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=40)
    inv = eng.start("fn@1", usage=usage(0, 40))
    g = inv.guard
    assert inv.model == "fallback" and inv.trace["fallback"] == inv.fallback is not None
    assert inv.alloc == Alloc(g.cpu_lo, g.mem_lo) != GRID.nearest(2.0, 512)


def test_the_reward_counts_what_the_invocation_held_until_each_give_back() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=60, dur=1.0)  # baseline 1 s at the user's size
    inv = eng.start("fn@1", usage=usage(0, 40))
    assert (inv.target.cpu_cores, inv.target.mem_limit_bytes) == (0.75, 128 * MB)
    clock.t += 0.5
    (gb,) = eng.on_sample(sample("fn@1", clock.t, cpu=0.7, mem_mb=50))  # CPU back at 0.5 s
    assert gb.resources == ("cpu",)
    clock.t += 0.5
    ended = eng.end(inv.id, usage=usage(0.5, 50, 60))
    core_s, mb_s = held_seconds(inv.trace, 1.0)
    assert core_s == pytest.approx(0.75 * 0.5 + 2.0 * 0.5)
    assert mb_s == pytest.approx(128.0 * 1.0)
    held_cpu, held_mem = core_s / (2.0 * 1.0), mb_s / (512.0 * 1.0)
    assert ended.reward == pytest.approx(
        invocation_reward(1.0, 1.0, cpu_held=held_cpu, mem_held=held_mem)
    )
    assert ended.reward > 0.0  # the same speed on less: a bonus


def test_the_end_reports_what_the_run_held_with_each_give_back_in_time() -> None:
    """A harvested run that gets CPU back at 0.5 s and memory at 0.8 s held its decision until
    each, the user's size after: its trace says so over the duration the hook reported, which a
    give-back after the run's own end does not touch."""
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=60, dur=1.0)
    inv = eng.start("fn@1", usage=usage(0, 40))
    assert (inv.target.cpu_cores, inv.target.mem_limit_bytes) == (0.75, 128 * MB)
    clock.t += 0.5
    (gb,) = eng.on_sample(sample("fn@1", clock.t, cpu=0.7, mem_mb=50))
    assert gb.resources == ("cpu",)
    clock.t += 0.3
    (gb,) = eng.on_sample(sample("fn@1", clock.t, cpu=1.0, mem_mb=120))
    assert gb.resources == ("memory",)
    clock.t += 0.4
    ended = eng.end(inv.id, usage=usage(0.5, 120, 125))
    assert ended.duration_s == pytest.approx(1.2)
    assert inv.trace["held_core_s"] == pytest.approx(0.75 * 0.5 + 2.0 * 0.7)
    assert inv.trace["held_mb_s"] == pytest.approx(128.0 * 0.8 + 512.0 * 0.4)
    # the hook's own duration: the memory give-back came after the run's end
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=2.0, mem_mb=512))
    run_one(eng, clock, cpu_peak=0.3, mem_mb=60, dur=1.0)
    inv = eng.start("fn@1", usage=usage(0, 40))
    clock.t += 0.2
    (gb,) = eng.on_sample(sample("fn@1", clock.t, cpu=0.7, mem_mb=50))
    assert gb.resources == ("cpu",)
    clock.t += 0.3
    (gb,) = eng.on_sample(sample("fn@1", clock.t, cpu=1.0, mem_mb=120))
    assert gb.resources == ("memory",)
    eng.end(inv.id, duration_s=0.4, usage=usage(0.5, 120, 125))
    assert inv.trace["held_core_s"] == pytest.approx(0.75 * 0.2 + 2.0 * 0.2)
    assert inv.trace["held_mb_s"] == pytest.approx(128.0 * 0.4)


def test_the_engine_feeds_the_burst_rule_the_cpu_work_it_measured() -> None:
    clock = Clock()
    eng = make_engine(clock=clock)
    eng.add_container(ref(cpu=1.0, mem_mb=256))
    inv = eng.start("fn@1", usage=usage(10.0, 40))  # cpuacct at 10 s when it starts
    clock.t += 0.04
    eng.end(inv.id, usage=usage(10.08, 40, 45))  # 80 ms of CPU in 40 ms: a 2-thread burst
    gs = eng.guards["fn"]
    assert gs.burst_cores == pytest.approx(0.08 / 0.1)  # its whole work within one 100 ms period
    assert gs.mem_peak_memory_mb == pytest.approx(45.0)
