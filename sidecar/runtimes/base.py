"""The container adapter protocol (cAdvisor-style): runtimes only *discover*.

A runtime answers "which containers are there, which function does each run, what did its user
ask for, where is its cgroup" and, where it can, reports invocation boundaries (Docker's
pause/unpause around each OpenWhisk activation). It never reads usage: only
``sidecar.cgroups`` / the sampler read cgroup files, identically for every runtime.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from sidecar import cgroups


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

    @property
    def cgroup_key(self) -> tuple[int, str]:
        """The cgroup itself, whichever runtime lists it: each has one owner (``Node._claim``)."""
        return (self.cgroup_version, self.cgroup_path)


@dataclass(frozen=True)
class RuntimeEvent:
    """A change a runtime pushes: a container came or went, or an invocation started or ended."""

    kind: Literal["added", "removed", "invocation_start", "invocation_end"]
    container_id: str
    ref: ContainerRef | None = None
    """Set for ``added`` (and for boundaries when the runtime knows the container)."""


class Runtime(Protocol):
    """What the node asks of every runtime (``sidecar.node.Node`` is typed against it).

    Subclass :class:`RuntimeBase`: it supplies the optional parts, so the node never probes.
    """

    name: str

    def discover(self) -> list[ContainerRef]:
        """All containers this runtime manages right now (a full listing: at start-up and on
        SIGHUP)."""
        ...

    def relist(self) -> list[ContainerRef]:
        """The periodic safety net for missed events: a listing that may be cheaper than
        ``discover`` (e.g. no re-inspection of known containers)."""
        ...

    def open(self, ref: ContainerRef) -> cgroups.Cgroup:
        """The cgroup object of one of this runtime's containers (the sampler keeps it open)."""
        ...

    def is_paused(self, container_id: str) -> bool | None:
        """Whether the container was paused (idle) when last seen; None where the runtime does
        not know."""
        ...

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """Pushed changes; a runtime without an event source yields nothing until closed."""
        ...

    def close(self) -> None:
        """Release the runtime's resources; its ``events()`` iterator then ends."""
        ...


class RuntimeBase(abc.ABC):
    """Defaults for :class:`Runtime`: a subclass gives ``name``, ``cgroup_root`` and
    ``discover`` and overrides what it can do better (a cheaper ``relist``, an event source)."""

    name: str
    cgroup_root: str = cgroups.DEFAULT_ROOT
    """Where cgroupfs is mounted (v1 refs hold paths relative to its controllers)."""

    def __init__(self) -> None:
        self._closed_event = asyncio.Event()

    @abc.abstractmethod
    def discover(self) -> list[ContainerRef]: ...

    def relist(self) -> list[ContainerRef]:
        return self.discover()

    def open(self, ref: ContainerRef) -> cgroups.Cgroup:
        if ref.cgroup_version == 1:
            return cgroups.CgroupV1(ref.cgroup_path, self.cgroup_root)
        return cgroups.CgroupV2(ref.cgroup_path)

    def is_paused(self, container_id: str) -> bool | None:
        return None

    async def events(self) -> AsyncIterator[RuntimeEvent]:
        """No event source: waits until closed, yielding nothing."""
        await self._closed_event.wait()
        return
        yield  # pragma: no cover  (makes this an async generator)

    def close(self) -> None:
        self._closed_event.set()
