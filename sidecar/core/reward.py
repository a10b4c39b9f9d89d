"""The per-invocation reward: what users feel, in one formula used by the simulator and the sidecar.

With ``rfet = exec / baseline`` (execution time relative to the user's size) and
``delay = (queueing + cold start) / max(baseline, delay_floor_s)``:

    r = (1 - rfet)                               # speed-up is good, slow-down bad, linearly
        - slowdown_weight * max(0, rfet - tolerance)   # and slow-downs much worse
        - delay_weight * delay                   # starving others (queueing) costs too
        - failure_penalty * failed               # an OOM kill and retry is the worst outcome

clipped to [-clip, 1]. The reference used sum(1 - 2 * slo) and ignored queueing and cold starts,
so an over-allocation that queued other invocations went unpunished. Delay is measured against
at least ``delay_floor_s`` (1 s): half a second of cold start on a 10 ms function is not fifty
times worse than on a 500 ms one to its user, and without the floor the unavoidable cold starts
of tiny functions drown every other term (they would all sit at -clip).
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
    clip: float = 10.0


def invocation_reward(
    exec_s: float,
    baseline_s: float,
    queue_s: float = 0.0,
    cold_s: float = 0.0,
    failed: bool = False,
    cfg: RewardConfig = RewardConfig(),
) -> float:
    if not (exec_s == exec_s and baseline_s == baseline_s):
        raise ValueError("reward of an invocation with an unknown execution or baseline time")
    base = baseline_s if baseline_s > 1e-3 else 1e-3
    rfet = exec_s / base
    slow = rfet - cfg.tolerance
    r = (
        (1.0 - rfet)
        - (cfg.slowdown_weight * slow if slow > 0.0 else 0.0)
        - cfg.delay_weight
        * (queue_s + cold_s)
        / (base if base > cfg.delay_floor_s else cfg.delay_floor_s)
        - (cfg.failure_penalty if failed else 0.0)
    )
    return -cfg.clip if r < -cfg.clip else (1.0 if r > 1.0 else r)
