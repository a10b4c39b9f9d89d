"""Every Prometheus metric of the daemon, in one place, on the daemon's own registry.

Names: prefix ``faasrm_``, base units (seconds, bytes, ratio), ``_total`` on counters. Labels are
bounded sets: resource (cpu, memory), outcome, reason (the safeguard's modes), and ``function``
for the harvested/accelerated counters, capped at ``max_function_labels`` distinct values (the
rest count as ``other``). Per-container detail goes to ``/debug/*``, never into labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

import sidecar
from sidecar.core.safeguard import MODES

disable_created_metrics()

_FAST = (10e-6, 25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3)
OTHER = "other"


class Metrics:
    def __init__(self, max_function_labels: int = 50, policy: str = "fallback") -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.max_function_labels = max_function_labels
        self._functions: set[str] = set()
        self.build_info = Gauge(
            "faasrm_build_info", "Version and running policy", ["version", "policy"], registry=r
        )
        self.set_policy(policy)
        self.decision_latency = Histogram(
            "faasrm_decision_latency_seconds",
            "Safeguard + features + inference per invocation",
            buckets=_FAST,
            registry=r,
        )
        self.actuation_latency = Histogram(
            "faasrm_actuation_latency_seconds",
            "Writing one allocation to the cgroup files",
            buckets=_FAST,
            registry=r,
        )
        self.tick_duration = Histogram(
            "faasrm_tick_duration_seconds",
            "Sampling + per-sample decisions per tick",
            buckets=_FAST + (0.1,),
            registry=r,
        )
        self.tick_overruns = Counter(
            "faasrm_tick_overruns_total", "Ticks skipped because one ran late", registry=r
        )
        self.samples = Counter("faasrm_samples_total", "Container samples read", registry=r)
        self.sample_errors = Counter(
            "faasrm_sample_errors_total", "Samples that failed", ["kind"], registry=r
        )
        for kind in ("gone", "io"):
            self.sample_errors.labels(kind)
        self.limit_writes = Counter(
            "faasrm_limit_writes_total",
            "Limit changes applied to containers",
            ["resource", "outcome"],
            registry=r,
        )
        for res in ("cpu", "memory"):
            for out in ("ok", "refused", "error"):
                self.limit_writes.labels(res, out)
        self.safeguard_trips = Counter(
            "faasrm_safeguard_trips_total",
            "Invocations pinned at the user's size by the safeguard",
            ["reason"],
            registry=r,
        )
        for mode in MODES[:3]:
            self.safeguard_trips.labels(mode)
        self.give_backs = Counter(
            "faasrm_give_backs_total",
            "Harvested resources returned mid-invocation",
            ["resource"],
            registry=r,
        )
        for res in ("cpu", "memory"):
            self.give_backs.labels(res)
        self.throttle_raises = Counter(
            "faasrm_throttle_raises_total",
            "Harvested CPU quotas returned to the user's size because the container was throttled "
            "in more than [actuation] throttle_target of a tick's CFS periods (also counted in "
            "faasrm_give_backs_total)",
            registry=r,
        )
        self.throttled_ratio = Histogram(
            "faasrm_invocation_throttled_ratio",
            "Share of an invocation's CFS periods in which its container was throttled",
            buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0),
            registry=r,
        )
        self.oom_kills = Counter(
            "faasrm_oom_kills_total", "OOM kills seen in managed containers", registry=r
        )
        self.harvested_oom_kills = Counter(
            "faasrm_harvested_oom_kills_total",
            "OOM kills during an invocation whose decision gave it less memory than its user's",
            registry=r,
        )
        self.oom_holds = Counter(
            "faasrm_oom_holds_total",
            "Tasks held at a harvested hard memory limit and given their memory back "
            '([actuation] v1_memory_harvest = "hold"): OOM kills under the hard limit',
            registry=r,
        )
        self.invocations = Counter(
            "faasrm_invocations_total", "Finished invocations", ["outcome"], registry=r
        )
        for out in ("success", "failure", "oom", "lost"):
            self.invocations.labels(out)
        self.harvested = Counter(
            "faasrm_harvested_invocations_total",
            "Invocations given less than the user's size",
            ["function"],
            registry=r,
        )
        self.accelerated = Counter(
            "faasrm_accelerated_invocations_total",
            "Invocations given more than the user's size",
            ["function"],
            registry=r,
        )
        self.model_loads = Counter(
            "faasrm_model_loads_total", "Model load attempts", ["outcome"], registry=r
        )
        for out in ("ok", "rejected", "rollback"):
            self.model_loads.labels(out)
        self.model_failures = Counter(
            "faasrm_model_failures_total",
            "Decisions where the model failed and the fallback decided",
            registry=r,
        )
        self.managed = Gauge("faasrm_managed_containers", "Containers under management", registry=r)
        self.active = Gauge("faasrm_active_invocations", "Invocations running now", registry=r)
        self.cpu_limit_ratio = Gauge(
            "faasrm_cpu_limit_ratio",
            "Sum of CPU limits of running invocations / sum of their user sizes",
            registry=r,
        )
        self.restores = Counter(
            "faasrm_restores_total", "Containers returned to user limits", ["outcome"], registry=r
        )
        for out in ("restored", "pending", "gone", "error"):
            self.restores.labels(out)
        self.spool_dropped = Counter(
            "faasrm_spool_dropped_records_total",
            "Trajectory records dropped unshipped because the spool was full",
            registry=r,
        )
        self.spool_corrupt = Counter(
            "faasrm_spool_corrupt_records_total",
            "Torn or unreadable trajectory records found in the spool (a crash mid-append)",
            registry=r,
        )
        self.spool_bytes = Gauge("faasrm_spool_bytes", "Bytes in the trajectory spool", registry=r)
        self.profile_saves = Counter(
            "faasrm_profile_saves_total",
            "Saves of what the node learned about each function (actuation.profiles_file)",
            ["result"],
            registry=r,
        )
        for out in ("ok", "error"):
            self.profile_saves.labels(out)
        self.profiled_functions = Gauge(
            "faasrm_profiled_functions",
            "Functions in the profiles file, as last restored or saved",
            registry=r,
        )
        self.shipped_records = Counter(
            "faasrm_shipper_records_total",
            "Trajectory records acknowledged by the trainer",
            registry=r,
        )
        self.shipped_batches = Counter(
            "faasrm_shipper_batches_total", "Trajectory batches sent", ["result"], registry=r
        )
        for out in ("stored", "duplicate", "rejected", "error"):
            self.shipped_batches.labels(out)
        self.shipper_failures = Gauge(
            "faasrm_shipper_consecutive_failures",
            "Failed sends to the trainer since the last one it answered (0: shipping works)",
            registry=r,
        )
        self.shipper_dropped = Counter(
            "faasrm_shipper_dropped_records_total",
            "Records the trainer refused as malformed (dropped, logged)",
            registry=r,
        )
        self.model_version = Gauge(
            "faasrm_model_registry_version",
            "Registry version of the running model (0: a local model or the fallback)",
            registry=r,
        )
        self.model_updates = Counter(
            "faasrm_model_updates_total",
            "Registry models received, by result",
            ["result"],
            registry=r,
        )
        for out in ("loaded", "rejected", "rolled_back"):
            self.model_updates.labels(out)

    def set_policy(self, policy: str) -> None:
        self.build_info.clear()
        self.build_info.labels(sidecar.__version__, policy).set(1)

    def function_label(self, function: str) -> str:
        if function in self._functions:
            return function
        if len(self._functions) < self.max_function_labels:
            self._functions.add(function)
            return function
        return OTHER
