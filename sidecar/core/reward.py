"""The per-invocation reward: what users feel and what an allocation costs, in one formula used by
the simulator and the sidecar.

With ``rfet = exec / baseline`` (execution time relative to the user's size),
``delay = (queueing + cold start) / max(baseline, delay_floor_s)``, ``caused`` the admission
queue's waiting attributed to this invocation on the same scale, and ``cpu_held`` / ``mem_held``
the core-seconds / MB-seconds it held relative to what the user's size would have held for the
same invocation (allocation x execution time over user size x baseline; 1 under Fixed):

    r = (1 - rfet)                               # speed-up is good, slow-down bad, linearly
        - slowdown_weight * max(0, rfet - tolerance)   # and slow-downs much worse
        - delay_weight * (delay + caused)        # its own waiting, and the waiting it causes
        - efficiency_weight * ((cpu_held - 1) + (mem_held - 1)) / 2   # what it holds
        - failure_penalty * failed               # an OOM kill and retry is the worst outcome

(a failed run gets the failure penalty instead of the efficiency term: a killed run that held
little saved nothing, its work is done again)

clipped to [-clip, 1]. The reference used sum(1 - 2 * slo) and ignored queueing, cold starts and
the resources held, so an over-allocation that queued other invocations went unpunished and a
harvest earned nothing. Delay is measured against at least ``delay_floor_s`` (1 s): half a second
of cold start on a 10 ms function is not fifty times worse than on a 500 ms one to its user, and
without the floor the unavoidable cold starts of tiny functions drown every other term (they
would all sit at -clip).

The efficiency term is 0 at the user's size and a bonus when harvesting (held < 1). ``caused`` is
the queue's waiting while the invocation ran, shared among the running invocations in proportion
to what each holds above the user's size (below it: a credit, negative), so a harvest that lets
a queued invocation start earns what the queue did not wait. Only a simulator sees the whole
cluster's queue; a node passes 0 (it has no admission queue of its own).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardConfig:
    slowdown_weight: float = 4.0
    tolerance: float = 1.0
    delay_weight: float = 1.0
    delay_floor_s: float = 1.0
    failure_penalty: float = 5.0
    efficiency_weight: float = 0.2
    """Weight of the resources held (the mean of the CPU and memory ratios, minus 1): harvesting
    half of both memory and CPU at the same speed earns 0.1, as much as running 10% faster;
    twice the cores for no speed-up costs 0.1. 0 is the reward without resource efficiency."""
    clip: float = 10.0


def invocation_reward(
    exec_s: float,
    baseline_s: float,
    queue_s: float = 0.0,
    cold_s: float = 0.0,
    failed: bool = False,
    cfg: RewardConfig = RewardConfig(),
    *,
    cpu_held: float = 1.0,
    mem_held: float = 1.0,
    caused_queue_s: float = 0.0,
) -> float:
    """The reward of one invocation (module docstring); ``cpu_held`` / ``mem_held`` are ratios to
    the user's size (``held_ratio``), ``caused_queue_s`` seconds of others' waiting (negative: a
    credit)."""
    if not (exec_s == exec_s and baseline_s == baseline_s):
        raise ValueError("reward of an invocation with an unknown execution or baseline time")
    base = baseline_s if baseline_s > 1e-3 else 1e-3
    rfet = exec_s / base
    slow = rfet - cfg.tolerance
    r = (
        (1.0 - rfet)
        - (cfg.slowdown_weight * slow if slow > 0.0 else 0.0)
        - cfg.delay_weight
        * (queue_s + cold_s + caused_queue_s)
        / (base if base > cfg.delay_floor_s else cfg.delay_floor_s)
        - (
            cfg.failure_penalty
            if failed
            else cfg.efficiency_weight * 0.5 * (cpu_held + mem_held - 2.0)
        )
    )
    return -cfg.clip if r < -cfg.clip else (1.0 if r > 1.0 else r)


def held_ratio(held: float, user: float, baseline_s: float) -> float:
    """Resource-seconds ``held`` (allocation x time, give-backs included) over what the user's
    size ``user`` holds for the same invocation (``user x baseline_s``); 1 when unknown."""
    ref = user * baseline_s
    return held / ref if ref > 0.0 else 1.0
