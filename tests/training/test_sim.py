"""The simulator: determinism, the duration model's invariants, queueing, OOM, the Gym env."""

from __future__ import annotations

from dataclasses import replace

import gymnasium as gym
import numpy as np
import pytest

from sidecar.core.grid import Alloc
from sidecar.core.safeguard import FIRST
from training.baselines import Fixed, Oracle
from training.evaluate import metrics, run
from training.sim.cluster import ClusterConfig, ClusterSim
from training.sim.env import ENV_ID
from training.sim.presets import get_preset


@pytest.fixture(scope="module")
def small():
    p = get_preset("small")
    return p, p.build(3)


def _run(p, wl, decide, cluster=None):
    sim = ClusterSim(wl, cluster or p.cluster, p.grid)
    while (req := sim.next_request()) is not None:
        sim.apply(decide(sim, req))
    sim.run_to_end()
    return sim


def test_workload_is_reproducible_and_seeded(small):
    p, wl = small
    again = p.build(3)
    other = p.build(4)
    assert np.array_equal(wl.arrival_s, again.arrival_s)
    assert np.array_equal(wl.duration_s, again.duration_s)
    assert not np.array_equal(wl.duration_s[:50], other.duration_s[:50])


def test_users_are_over_and_under_provisioned(small):
    p, wl = small
    prov = wl.provisioning(p.grid)
    # The original simulator gave every function the same ideal size; ours must not.
    assert 0.3 < prov["cpu_over"] < 0.9
    assert 0.1 < prov["cpu_under"] < 0.7
    assert prov["mem_over"] > 0.5


def test_fixed_has_rfet_exactly_one_and_every_invocation_finishes(small):
    p, wl = small
    sim = _run(p, wl, lambda s, r: r.user)
    assert sim.results.done.all()
    rfet = sim.results.exec_s / sim.results.baseline_s
    assert np.allclose(rfet, 1.0)
    assert not sim.results.failed.any()


def test_extra_cpu_beyond_parallelism_does_not_help(small):
    p, wl = small
    sim_user = _run(p, wl, lambda s, r: r.user)
    sim_max = _run(p, wl, lambda s, r: Alloc(p.grid.cpu_units, r.user.mem))
    par = wl.parallelism[wl.fn]
    user_cores = wl.user_cpu[wl.fn] * p.grid.cpu_unit_cores
    saturated = par <= user_cores  # already has all the CPU it can use
    rfet = sim_max.results.exec_s / sim_max.results.baseline_s
    # No speed-up at all where the user's cores already cover the parallelism (contention aside).
    assert np.all(rfet[saturated] >= 1.0 - 1e-9)
    # And a real speed-up for under-provisioned CPU-bound functions.
    hungry = (par >= 2 * user_cores) & (wl.cpu_frac[wl.fn] > 0.5)
    assert hungry.any()
    assert np.mean(rfet[hungry]) < 0.8
    assert sim_user.results.done.all()


def test_memory_below_working_set_is_an_oom_and_a_retry_or_a_give_back(small):
    p, wl = small
    hard = replace(p.cluster, oom_hold=False)  # the reference's hard limit
    sim = _run(p, wl, lambda s, r: Alloc(r.user.cpu, 1), cluster=hard)
    r = sim.results
    below = wl.working_set_mb > p.grid.mem_unit_mb
    saved = r.give_backs > 0
    # every run below its working set is either killed or saved by the give-back, never both
    assert np.array_equal(r.failed | saved, below)
    assert not (r.failed & saved).any()
    assert r.failed.sum() > saved.sum() > 0  # a limit of one unit is mostly reached at once
    # killed where its memory reached the limit, then a cold start and a rerun at the user's size
    killed = r.failed
    assert np.all(r.exec_s[killed] >= r.baseline_s[killed] + wl.cold_start_s[killed] - 1e-9)
    np.testing.assert_allclose(r.exec_s[saved], r.baseline_s[saved])  # no slowdown above the ws
    assert not wl.spike[saved].any()  # a spike is allocated at once: nothing saves it
    # with the OOM hold (the default) each of those kills is a tick's wait instead
    held = _run(p, wl, lambda s, r: Alloc(r.user.cpu, 1)).results
    assert not held.failed.any() and np.array_equal(held.give_backs > 0, below)
    np.testing.assert_allclose(held.exec_s[saved], held.baseline_s[saved])  # usage give-backs
    tick = p.cluster.tick_s
    below_user = killed & (wl.user_mem[wl.fn] > 1)  # a harvest: the user's size is above it
    assert below_user.any()
    np.testing.assert_allclose(held.exec_s[below_user], held.baseline_s[below_user] + tick)


def test_queued_invocations_wait_and_do_not_progress(small):
    p, wl = small
    tight = replace(p.cluster, servers=1, mem_mb=p.grid.max_mb, cpu_overcommit=1.0)
    sim = _run(p, wl, lambda s, r: Alloc(p.grid.cpu_units, p.grid.mem_units), cluster=tight)
    r = sim.results
    assert r.done.all()
    assert (r.queue_s > 0).mean() > 0.5
    # One slot: invocations run strictly one after another, so spans never overlap.
    start = wl.arrival_s + r.queue_s
    end = start + r.cold_s + r.exec_s
    order = np.argsort(start)
    assert np.all(start[order][1:] >= end[order][:-1] - 1e-6)


def test_contention_slows_an_oversubscribed_server(small):
    p, wl = small
    roomy = _run(p, wl, lambda s, r: r.user)
    crowded_cfg = replace(p.cluster, servers=1, cores=2.0, mem_mb=8192.0, cpu_overcommit=8.0)
    crowded = _run(p, wl, lambda s, r: r.user, cluster=crowded_cfg)
    assert np.mean(crowded.results.baseline_s) > 1.05 * np.mean(roomy.results.baseline_s)


def test_oracle_beats_fixed_and_never_fails(small):
    p, wl = small
    sim = ClusterSim(wl, p.cluster, p.grid)
    run(sim, Fixed())
    fixed = metrics(sim)
    run(sim, Oracle())
    oracle = metrics(sim)
    assert oracle["mean_rfet"] < fixed["mean_rfet"] - 0.03
    assert oracle["failures"] == 0
    assert oracle["harvested_frac"] > 0.3


def test_cluster_rejects_servers_too_small_for_the_grid(small):
    p, wl = small
    with pytest.raises(ValueError, match="largest allocation"):
        ClusterSim(wl, ClusterConfig(servers=1, cores=1.0, mem_mb=128.0), p.grid)


def test_a_preset_changes_one_safeguard_setting_and_keeps_the_others():
    base = get_preset("small").with_safeguard(decline_when_queued=True)
    tight = base.with_safeguard(mem_margin_units=0.25)
    assert tight.safeguard.mem_margin_units == 0.25
    assert tight.safeguard.decline_when_queued, "a second flag dropped the first"
    assert replace(tight, safeguard=base.safeguard) == base
    assert base.with_safeguard() is base


def test_a_restart_without_profiles_calibrates_every_function_again(small):
    """``restart_every_s``: after each restart a function's first decision runs at the user's
    size (the safeguard's FIRST mode), as on a node that forgot it; without restarts only its
    first ever must."""
    p, wl = small
    every = float(wl.arrival_s.max()) / 2.5  # two restarts
    modes: dict[str, list[tuple[float, int, str]]] = {"kept": [], "forgot": []}

    def record(tag):
        def decide(sim, r):
            modes[tag].append((r.now_s, r.fn, r.guard.mem_mode))
            return r.user

        return decide

    kept = _run(p, wl, record("kept"))
    forgot = _run(p, wl, record("forgot"), replace(p.cluster, restart_every_s=every))
    assert (kept.restarts, forgot.restarts) == (0, 2)
    for tag, epoch_of in (("kept", lambda t: 0), ("forgot", lambda t: int(t // every))):
        first = set()
        for now, fn, mode in modes[tag]:
            key = (fn, epoch_of(now))
            if key not in first:
                assert mode == FIRST, (tag, now, fn, mode)
                first.add(key)
    calibrations = {tag: sum(m == FIRST for *_, m in v) for tag, v in modes.items()}
    assert calibrations["forgot"] > calibrations["kept"]


def test_gym_env_steps_until_every_invocation_is_rewarded():
    env = gym.make(ENV_ID, preset="sample", fixed_seed=0, disable_env_checker=True)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(
        {k: (v.astype(np.int8) if k == "mask" else v) for k, v in obs.items()}
    )
    steps, rewarded, total = 1, 0, 0.0
    while True:
        a = int(np.flatnonzero(obs["mask"])[0])
        obs, r, term, trunc, info = env.step(a)
        rewarded += len(info["rewarded"])
        total += r
        assert np.isclose(r, sum(info["rewards"]))
        log = env.unwrapped.sim.log
        # rewards arrive when invocations finish (with the queueing they caused), not before
        assert all(log.done[i] for i in info["rewarded"])
        assert info["rewards"] == [log.reward[i] for i in info["rewarded"]]
        if term:
            break
        steps += 1
    n = env.unwrapped.sim.wl.n_invocations
    assert steps == n and rewarded == n
    assert np.isfinite(total)


def test_gym_env_refuses_a_masked_action():
    env = gym.make(ENV_ID, preset="sample", fixed_seed=0, disable_env_checker=True)
    obs, _ = env.reset(seed=0)
    bad = int(np.flatnonzero(~obs["mask"])[0])
    with pytest.raises(ValueError, match="masked out"):
        env.step(bad)


def test_short_episodes_deliver_every_reward_by_their_last_step():
    env = gym.make(ENV_ID, preset="small", max_decisions=150, disable_env_checker=True)
    obs, info = env.reset(seed=5)
    decided = {info["inv"]}
    rewarded: list[int] = []
    for step in range(150):  # noqa: B007 (asserted after the loop)
        obs, _, term, _, info = env.step(int(np.flatnonzero(obs["mask"])[-1]))
        rewarded.extend(info["rewarded"])
        if term:
            break
        decided.add(info["inv"])
    assert term and step == 149
    assert sorted(rewarded) == sorted(decided)
