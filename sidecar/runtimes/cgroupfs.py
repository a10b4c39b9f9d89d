"""The catch-all runtime: plain cgroups, listed in the config or found under a parent (v1 and v2).

Discovery only (cAdvisor's ``raw`` handler): which cgroups are containers, which function each
runs and what its user asked for. The user's size comes from the config entry, else from the
config's defaults for discovered children, else from the cgroup's own limits at first sight
(then ``labels["user_from"] == "limits"`` and the actuator restores those exact limits; an
unlimited resource counts as the host's capacity for the policy).

A discovered child ``<parent>/<name>`` runs function ``name`` up to an optional ``@instance``
suffix (``thumbnail@3`` -> ``thumbnail``). Boundaries: this runtime has no event source; the
hook API or CPU-activity inference (``[boundaries] infer``) provides them.
"""

from __future__ import annotations

import os
from typing import Literal

from sidecar import cgroups
from sidecar.config import CgroupfsConfig, ContainerConfig
from sidecar.runtimes.base import ContainerRef, RuntimeBase, UserSize
from sidecar.units import MB


def function_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1].split("@", 1)[0]


class CgroupfsRuntime(RuntimeBase):
    name = "cgroupfs"

    def __init__(self, cfg: CgroupfsConfig, host_cores: float, host_mem_bytes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.cgroup_root = cfg.root
        self.version: Literal[1, 2] = cfg.version or cgroups.detect_version(cfg.root)  # type: ignore[assignment]
        self.host_cores = host_cores
        self.host_mem_bytes = host_mem_bytes
        self._v2_base = (cgroups.v2_base(cfg.root) or cfg.root) if self.version == 2 else ""
        self._dirs: dict[str, tuple[str, ...]] = {}  # rel -> its directories (joined once)

    # -------------------------------------------------------------------------------- listing
    def _exists(self, rel: str, quick: bool = False) -> bool:
        """The cgroup's directories exist (``quick``: only the first, for the periodic relist:
        the sampler notices a half-removed cgroup itself)."""
        dirs = self._dirs.get(rel)
        if dirs is None:
            if self.version == 1:
                dirs = tuple(os.path.join(self.cgroup_root, c, rel) for c in cgroups.V1_CONTROLLERS)
            else:
                dirs = (os.path.join(self._v2_base, rel),)
            if len(self._dirs) > 100_000:
                self._dirs.clear()
            self._dirs[rel] = dirs
        if quick:
            return os.path.isdir(dirs[-1])
        return all(os.path.isdir(d) for d in dirs)

    def _children(self) -> list[str]:
        parent = self.cfg.parent.strip("/")
        if not parent:
            return []
        base = os.path.join(self.cgroup_root, "cpu") if self.version == 1 else self._v2_base
        try:
            names = sorted(e.name for e in os.scandir(os.path.join(base, parent)) if e.is_dir())
        except OSError:
            return []
        return [f"{parent}/{n}" for n in names]

    def cgroup_path(self, rel: str) -> str:
        return rel if self.version == 1 else os.path.join(self._v2_base, rel)

    def _user(self, rel: str, entry: ContainerConfig | None) -> tuple[UserSize, dict[str, str]]:
        cpu = entry.cpu_cores if entry else self.cfg.default_cpu_cores
        mem_mb = entry.mem_mb if entry else self.cfg.default_mem_mb
        weight = entry.cpu_weight if entry else 100
        labels = {"user_from": "config"}
        if cpu <= 0 or mem_mb <= 0:
            limits = self._open_rel(rel).read_limits()
            labels = {"user_from": "limits"} if cpu <= 0 and mem_mb <= 0 else {"user_from": "mixed"}
            if cpu <= 0:
                cpu = limits.cpu_quota_cores or self.host_cores
                weight = limits.cpu_weight
            if mem_mb <= 0:
                mem_mb = (limits.mem_limit_bytes or self.host_mem_bytes) / MB
        return UserSize(cpu_cores=cpu, mem_bytes=int(mem_mb * MB), cpu_weight=weight), labels

    def _open_rel(self, rel: str) -> cgroups.Cgroup:
        if self.version == 1:
            return cgroups.CgroupV1(rel, self.cgroup_root)
        return cgroups.CgroupV2(os.path.join(self._v2_base, rel))

    def relist(self) -> list[ContainerRef]:
        """The periodic safety net: ``discover`` with one directory check per cgroup."""
        return self.discover(quick=True)

    def discover(self, quick: bool = False) -> list[ContainerRef]:
        listed = {c.path.strip("/"): c for c in self.cfg.containers}
        rels = list(listed) + [r for r in self._children() if r not in listed]
        out = []
        for rel in rels:
            if not self._exists(rel, quick):
                continue
            entry = listed.get(rel)
            try:
                user, labels = self._user(rel, entry)
            except cgroups.CgroupError:
                continue  # vanished or unreadable while listing: the next listing retries
            out.append(
                ContainerRef(
                    id=rel,
                    function=(entry.function if entry and entry.function else function_of(rel)),
                    runtime=self.name,
                    cgroup_path=self.cgroup_path(rel),
                    cgroup_version=self.version,
                    user=user,
                    labels=labels,
                )
            )
        return out
