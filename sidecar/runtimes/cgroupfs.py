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
        self._dirs: dict[str, tuple[tuple[str, ...], str, str]] = {}  # rel -> _dirs_of(rel)
        self._refs: dict[str, tuple[ContainerConfig | None, ContainerRef]] = {}  # last listing

    # -------------------------------------------------------------------------------- listing
    def _dirs_of(self, rel: str) -> tuple[tuple[str, ...], str, str]:
        """The cgroup's directories, and the last one's parent and name (joined once)."""
        found = self._dirs.get(rel)
        if found is None:
            if self.version == 1:
                dirs = tuple(os.path.join(self.cgroup_root, c, rel) for c in cgroups.V1_CONTROLLERS)
            else:
                dirs = (os.path.join(self._v2_base, rel),)
            found = (dirs, *os.path.split(dirs[-1]))
            if len(self._dirs) > 100_000:
                self._dirs.clear()
            self._dirs[rel] = found
        return found

    def _exists(self, rel: str) -> bool:
        """The cgroup's directories exist."""
        return all(os.path.isdir(d) for d in self._dirs_of(rel)[0])

    def _present(self, rels: list[str]) -> set[str]:
        """Those of ``rels`` whose last directory exists (the periodic relist: the sampler
        notices a half-removed cgroup itself). Per parent directory, one scandir where the
        cgroups asked about are at least a quarter of its subdirectories (a kernfs directory's
        link count is 2 + its subdirectories), else a stat per cgroup: a listing costs about a
        sixth of a stat per entry, files included."""
        by_parent: dict[str, dict[str, str]] = {}
        for rel in rels:
            _, parent, name = self._dirs_of(rel)
            by_parent.setdefault(parent, {})[name] = rel
        present: set[str] = set()
        for parent, group in by_parent.items():
            try:
                if 4 * len(group) >= os.stat(parent).st_nlink - 2:
                    with os.scandir(parent) as it:
                        present.update(group[e.name] for e in it if e.name in group and e.is_dir())
                else:
                    present.update(r for n, r in group.items() if os.path.isdir(f"{parent}/{n}"))
            except OSError:
                continue
        return present

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
        """Every listed cgroup that exists. ``quick`` (the periodic relist) hands back the ref
        of the last listing for a cgroup listed under the same config entry, without rebuilding
        it: the relist runs every ``discover_every_s`` and was the tick's largest cost after
        the reads (docs/sidecar.md, "Sampling cost")."""
        listed = {c.path.strip("/"): c for c in self.cfg.containers}
        rels = list(listed) + [r for r in self._children() if r not in listed]
        out, known, last = [], {}, self._refs
        present = self._present(rels) if quick else None
        for rel in rels:
            if not (rel in present if present is not None else self._exists(rel)):
                continue
            entry = listed.get(rel)
            kept = last.get(rel) if quick else None
            if kept is not None and kept[0] is entry:
                ref = kept[1]
            else:
                try:
                    user, labels = self._user(rel, entry)
                except cgroups.CgroupError:
                    continue  # vanished or unreadable while listing: the next listing retries
                ref = ContainerRef(
                    id=rel,
                    function=(entry.function if entry and entry.function else function_of(rel)),
                    runtime=self.name,
                    cgroup_path=self.cgroup_path(rel),
                    cgroup_version=self.version,
                    user=user,
                    labels=labels,
                )
            known[rel] = (entry, ref)
            out.append(ref)
        self._refs = known
        return out
