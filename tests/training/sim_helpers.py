"""Driving the simulator with given allocations (duration-model and harvest-model tests)."""

from __future__ import annotations

from sidecar.core.grid import Alloc, ResourceGrid
from training.sim.cluster import ClusterConfig, ClusterSim
from training.sim.workload import Workload


def run_allocs(
    wl: Workload, allocs: list[Alloc], cluster: ClusterConfig, grid: ResourceGrid
) -> ClusterSim:
    """Every invocation of ``wl`` at its allocation in ``allocs``, in order, to the end."""
    sim = ClusterSim(wl, cluster, grid)
    for alloc in allocs:
        assert sim.next_request() is not None
        sim.apply(alloc)
    sim.run_to_end()
    return sim
