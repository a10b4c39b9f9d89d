"""Named simulation setups: cluster, grid, trace size and workload, in one place.

``paper`` matches the reference's simulation (20 servers x 8 cores x 2 GB, 1,000 functions from
an Azure-shaped trace, per-function max 8 cores and 512 MB, >= 85,000 evaluated invocations).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sidecar.core.grid import ResourceGrid
from sidecar.core.safeguard import SafeguardConfig
from training.sim.cluster import ClusterConfig
from training.sim.workload import Workload, WorkloadConfig, build_workload
from training.traces import Trace, generate, sample_trace


@dataclass(frozen=True)
class Preset:
    name: str
    cluster: ClusterConfig
    grid: ResourceGrid = ResourceGrid()
    n_functions: int = 1000
    minutes: int = 60
    rate_per_min: float | None = None
    """Mean invocations per minute over the whole trace (None: the generator's natural scale)."""
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    sample: bool = False
    """Use the bundled 10-function Azure sample instead of a generated trace."""
    safeguard: SafeguardConfig = field(default_factory=SafeguardConfig)
    """The safeguard every evaluation on this preset decides under (the node's default)."""

    def with_safeguard(self, **changes: object) -> Preset:
        """This preset deciding under its own safeguard with ``changes`` applied (a CLI flag
        changes one setting and keeps any other the preset carries)."""
        return replace(self, safeguard=replace(self.safeguard, **changes)) if changes else self

    def with_cluster(self, **changes: object) -> Preset:
        """This preset on its own cluster with ``changes`` applied (as ``with_safeguard``)."""
        return replace(self, cluster=replace(self.cluster, **changes)) if changes else self

    def trace(self, seed: int) -> Trace:
        if self.sample:
            return sample_trace()
        return generate(self.n_functions, self.minutes, seed, mean_rate_per_min=self.rate_per_min)

    def build(self, seed: int, trace: Trace | None = None) -> Workload:
        """The workload for one seed: the trace and every random draw derive from it."""
        return build_workload(trace or self.trace(seed), self.grid, seed, self.workload)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # 1 hour at ~2,000 invocations/min: ~125k invocations on a cluster that is busy (CPU
        # admission and contention bind at peaks) but not saturated under Fixed.
        Preset(
            "paper",
            ClusterConfig(servers=20, cores=8.0, mem_mb=2048.0, cpu_overcommit=2.5),
            minutes=60,
            rate_per_min=2000.0,
        ),
        Preset(
            "small",
            ClusterConfig(servers=4, cores=8.0, mem_mb=2048.0),
            n_functions=200,
            minutes=30,
            rate_per_min=240.0,
        ),
        Preset("sample", ClusterConfig(servers=2, cores=8.0, mem_mb=2048.0), sample=True),
        # The local invoker of ``faasrm demo`` / ``bench real`` scaled out: 2-core hosts, a
        # 0.25-core x 8 / 64 MB x 8 grid, CPU at 1 core per 256 MB of the user's memory (one CPU
        # unit per memory unit), functions of seconds rather than minutes.
        Preset(
            "invoker",
            ClusterConfig(servers=4, cores=2.0, mem_mb=4096.0, cpu_overcommit=4.0),
            grid=ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8),
            n_functions=160,
            minutes=30,
            rate_per_min=160.0,
            workload=WorkloadConfig(user_cpu_per_mem_unit=1.0, max_duration_s=60.0),
        ),
    )
}


def get_preset(name: str, **overrides: object) -> Preset:
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
    return replace(preset, **overrides) if overrides else preset
