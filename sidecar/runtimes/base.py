"""The container adapter protocol (cAdvisor-style): runtimes only *discover*.

A runtime answers "which containers are there, which function does each run, what did its user
ask for, where is its cgroup" and, where it can, reports invocation boundaries (Docker's
pause/unpause around each OpenWhisk activation). It never reads usage: only
``sidecar.cgroups`` / the sampler read cgroup files, identically for every runtime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class UserSize:
    """What the function's user asked for: the limits restored whenever no decision owns them."""

    cpu_cores: float
    """CPU as cores (quota / period, or derived from shares as OpenWhisk does)."""
    mem_bytes: int
    cpu_weight: int = 100
    """cgroup v2-style weight (v1 shares are converted by sidecar.cgroups)."""


@dataclass(frozen=True)
class ContainerRef:
    """One discovered container."""

    id: str
    """Stable id: the cgroup path for cgroupfs, the Docker container id for docker."""
    function: str
    runtime: str
    cgroup_path: str
    """v1: path relative to each controller's mount (e.g. ``docker/<id>``); v2: absolute dir."""
    cgroup_version: Literal[1, 2]
    user: UserSize
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RuntimeEvent:
    """A change a runtime pushes: a container came or went, or an invocation started or ended."""

    kind: Literal["added", "removed", "invocation_start", "invocation_end"]
    container_id: str
    ref: ContainerRef | None = None
    """Set for ``added`` (and for boundaries when the runtime knows the container)."""


class Runtime(Protocol):
    name: str

    def discover(self) -> list[ContainerRef]:
        """All containers this runtime manages right now (a full listing; polled at start-up,
        on SIGHUP and periodically as a safety net for missed events)."""
        ...

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """Pushed changes; runtimes without an event source return an iterator that never yields."""
        ...

    def close(self) -> None: ...
