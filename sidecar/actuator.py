"""Apply allocations to containers through ``sidecar.cgroups``, and put the user's limits back.

Crash safety: before the actuator first changes a container it writes the state file (atomic
write + fsync + rename) listing every managed container with the user's exact limits. Whatever
happens afterwards (SIGKILL mid-write included), the next start-up's ``recover()`` writes those
limits back before anything else runs. The file changes only when the set of managed containers
or a user's size changes, never per invocation, and at a clean shutdown, which marks it
``clean`` once every container is back at its user's limits (nothing for the next start to do).

The memory floor: ``Cgroup.write_limits`` refuses a hard limit below usage + headroom. A refused
allocation is applied with the user's memory instead (CPU still changes); a refused restore (a
container accelerated past its user's memory and still using it) restores CPU now and memory on a
later tick (``retry_restores``), never by forcing the kernel to reclaim or kill.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sidecar import cgroups
from sidecar.cgroups import Limits
from sidecar.durable import write_atomic
from sidecar.engine import USER_TARGET, Target
from sidecar.runtimes.base import ContainerRef, UserSize
from sidecar.units import MB

if TYPE_CHECKING:
    from sidecar.config import Config

log = logging.getLogger("faasrm.actuator")
STATE_VERSION = 1


@dataclass
class Managed:
    container_id: str
    cgroup_path: str
    version: int
    root: str
    user: Limits
    cg: cgroups.Cgroup | None = None
    applied: Target = USER_TARGET
    owner: str | None = None
    """Invocation whose decision the current limits are; None = at (or returning to) user limits."""
    restore_pending: bool = False
    written: Limits | None = None
    """The limits in the cgroup as far as the actuator knows: the last ones it wrote or read."""

    def to_json(self) -> dict:
        return {
            "cgroup_path": self.cgroup_path,
            "version": self.version,
            "root": self.root,
            "user": dataclasses.asdict(self.user),
        }


def user_limits(user: UserSize, original: Limits, exact: bool) -> Limits:
    """The limits restored whenever no decision owns a container.

    ``exact``: the user's size was read from these very limits (keep them, unlimited included);
    otherwise the configured size with the cgroup's own period, soft limit and OOM hold.
    """
    if exact:
        return original
    return Limits(
        cpu_quota_cores=user.cpu_cores,
        cpu_period_us=original.cpu_period_us,
        cpu_weight=user.cpu_weight,
        mem_limit_bytes=user.mem_bytes,
        mem_high_bytes=original.mem_high_bytes,
        mem_oom_hold=original.mem_oom_hold,  # a container run with --oom-kill-disable keeps it
    )


def target_limits(user: Limits, target: Target, period_us: int, oom_hold: bool = False) -> Limits:
    """Limits for a target (``None`` fields take the user's value; a changed quota comes with
    the target's period, else ``period_us``). ``oom_hold``: a hard memory limit below the user's
    holds a task that outgrows it instead of killing it (``Limits.mem_oom_hold``)."""
    cpu_changed = target.cpu_cores is not None
    if cpu_changed:
        period_us = target.cpu_period_us or period_us
    mem = target.mem_limit_bytes
    harvested = mem is not None and (user.mem_limit_bytes is None or mem < user.mem_limit_bytes)
    return Limits(
        cpu_quota_cores=target.cpu_cores if cpu_changed else user.cpu_quota_cores,
        cpu_period_us=period_us if cpu_changed else user.cpu_period_us,
        cpu_weight=user.cpu_weight if target.cpu_weight is None else target.cpu_weight,
        mem_limit_bytes=user.mem_limit_bytes
        if target.mem_limit_bytes is None
        else target.mem_limit_bytes,
        mem_high_bytes=user.mem_high_bytes
        if target.mem_high_bytes is None
        else target.mem_high_bytes,
        mem_oom_hold=user.mem_oom_hold or (oom_hold and harvested),
    )


def restore_plan(managed: dict[str, Managed], live: set[str]) -> list[str]:
    """Containers to put back at user limits: every managed one no live decision owns (pure)."""
    return [cid for cid, m in managed.items() if m.owner is None or m.owner not in live]


def open_for(m: Managed) -> cgroups.Cgroup:
    if m.version == 1:
        return cgroups.CgroupV1(m.cgroup_path, m.root)
    return cgroups.CgroupV2(m.cgroup_path)


class Actuator:
    def __init__(
        self,
        state_file: str | Path,
        headroom_bytes: int,
        period_us: int = 100_000,
        opener: Callable[[Managed], cgroups.Cgroup] = open_for,
        oom_hold: bool = False,
    ) -> None:
        self.state_file = Path(state_file)
        self.headroom_bytes = headroom_bytes
        self.period_us = period_us
        self.oom_hold = oom_hold
        """Harvested hard memory limits hold a task, not kill it (v1_memory_harvest = "hold")."""
        self.opener = opener
        self.managed: dict[str, Managed] = {}
        self.writes_ok = 0
        self.writes_failed = 0
        self.refused = 0
        self.held: set[str] = set()
        """Containers not at their user's limits: a decision's are in place, or a restore is
        pending. Kept as the limits change, so a tick never scans every container for them."""

    @classmethod
    def for_config(cls, cfg: Config) -> Actuator:
        """The actuator a node with ``cfg`` runs (the daemon, its crash recovery, the bench)."""
        return cls(
            cfg.actuation.state_file,
            int(cfg.safeguard.mem_headroom_mb * MB),
            cfg.actuation.cpu_period_us,
            oom_hold=cfg.actuation.oom_hold,
        )

    # -------------------------------------------------------------------------------- state
    def _save(self, clean: bool = False) -> None:
        data = {
            "version": STATE_VERSION,
            "pid": os.getpid(),
            "clean": clean,
            "containers": {cid: m.to_json() for cid, m in self.managed.items()},
        }
        write_atomic(self.state_file, json.dumps(data, sort_keys=True).encode())

    def save(self, clean: bool = False) -> None:
        """Write the state file now. ``clean``: every container is back at its user's limits
        (a clean shutdown), so the next start-up has nothing to restore."""
        self._save(clean)

    @staticmethod
    def read_state(path: str | Path) -> dict[str, Managed]:
        """The containers a previous run may have left off their user's limits (none after a
        clean shutdown)."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ValueError(f"unreadable state file {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"state file {path}: unknown version {data.get('version')!r}")
        if data.get("clean"):
            return {}
        out = {}
        for cid, e in data.get("containers", {}).items():
            out[cid] = Managed(
                cid, e["cgroup_path"], int(e["version"]), e["root"], Limits(**e["user"])
            )
        return out

    def recover(self) -> dict[str, str]:
        """Start-up: restore every container of the state file to its user limits.

        Returns container id -> "restored" | "gone" | "pending" | "error: ...". Gone containers
        are dropped; the others stay managed (not owned) until discovery adopts or forgets them.
        """
        results: dict[str, str] = {}
        for cid, m in self.read_state(self.state_file).items():
            self.managed[cid] = m
            m.owner = "recovering"  # not live: restore_plan picks it
            results[cid] = self._restore(m)
            if results[cid] == "gone":
                self.managed.pop(cid, None)
        if results:
            self._save()
        return results

    # -------------------------------------------------------------------------------- adoption
    def adopt(
        self, ref: ContainerRef, cg: cgroups.Cgroup | None = None, save: bool = True
    ) -> Managed:
        """Start managing a container; its user limits are persisted before any change.

        ``save=False`` defers the state file to a later ``save()`` (adopting many containers at
        once): the only write adopt itself makes puts the user's own limits in place, which is
        what a restore would write anyway, so the invariant "persisted before any harvest or
        acceleration" still holds as long as ``save()`` runs before the next ``apply``.
        """
        m = self.managed.get(ref.id)
        root = getattr(cg, "root", cgroups.DEFAULT_ROOT)
        if m is not None and m.cgroup_path == ref.cgroup_path:  # e.g. recovered after a crash
            if cg is not None:
                m.cg = cg
            if ref.labels.get("user_from") not in ("limits", "mixed"):
                # the configured size, which may have changed while the node was down, wins, as
                # it does on a reload (and as the engine, which starts from it, assumes)
                before = m.user
                try:
                    self.set_user(ref.id, ref.user)
                except ValueError as exc:
                    log.warning(
                        "configured user size refused, the saved one kept",
                        extra={"container": ref.id, "reason": str(exc)},
                    )
                if m.user != before and m.owner is None:
                    self._restore(m)
            return m
        m = Managed(ref.id, ref.cgroup_path, ref.cgroup_version, root, Limits())
        m.cg = cg or self.opener(m)
        original = m.written = m.cg.read_limits()
        m.user = user_limits(ref.user, original, exact=ref.labels.get("user_from") == "limits")
        self.managed[ref.id] = m
        if save:
            self._save()
        # e.g. a fresh cgroup: put the user's limits in place now, or as soon as the kernel lets
        if original != m.user and self._restore(m) == "gone":
            self.managed.pop(ref.id, None)
            raise cgroups.CgroupGone(f"{ref.cgroup_path} vanished")
        return m

    def check_user(self, container_id: str, user: UserSize) -> Limits:
        """The user limits ``user`` means for this container; ValueError if the kernel would
        refuse them."""
        m = self.managed[container_id]
        new = user_limits(user, m.user, exact=False)
        if new != m.user:
            cgroups.check_limits(new)
        return new

    def set_user(self, container_id: str, user: UserSize) -> None:
        """A hook (or the config) reported the user's size: if it differs from the one saved,
        persist it before it is ever restored to. ValueError if the kernel would refuse it."""
        m = self.managed[container_id]
        new = self.check_user(container_id, user)
        if new != m.user:
            m.user = new
            self._save()

    def forget(self, container_id: str, restore: bool = True) -> str:
        """Stop managing a container, after putting its user's limits back (``restore``). A
        restore that fails keeps it, retried every tick until the limits are back; one that finds
        the cgroup gone (the container deleted) leaves nothing to restore, so it goes."""
        m = self.managed.get(container_id)
        if m is None:
            return "unknown"
        result = self._restore(m) if restore else "skipped"
        if restore and result != "gone" and m.restore_pending:
            return result
        self.managed.pop(container_id, None)
        self.held.discard(container_id)
        if m.cg is not None:
            m.cg.close()
        self._save()
        return result

    # -------------------------------------------------------------------------------- writes
    def _cg(self, m: Managed) -> cgroups.Cgroup:
        if m.cg is None:
            m.cg = self.opener(m)
        return m.cg

    def _write(self, m: Managed, limits: Limits) -> None:
        try:
            self._cg(m).write_limits(limits, headroom_bytes=self.headroom_bytes)
            m.written = limits
            self.writes_ok += 1
        except ValueError:
            self.refused += 1
            raise
        except cgroups.CgroupError:
            self.writes_failed += 1
            raise

    def apply(self, container_id: str, target: Target, owner: str) -> tuple[Target, float]:
        """Apply ``target`` for invocation ``owner``; returns (target applied, seconds taken).

        If the memory floor refuses the memory part, memory stays at the user's size. Raises
        CgroupGone / CgroupIOError (the limits are then unknown; the caller restores or forgets).
        """
        t0 = time.perf_counter()
        m = self.managed[container_id]
        m.owner = owner
        applied = target
        try:
            self._write(m, target_limits(m.user, target, self.period_us, self.oom_hold))
        except ValueError as exc:
            log.warning(
                "memory floor kept the user's memory",
                extra={"container": container_id, "reason": str(exc)},
            )
            applied = target._replace(mem_limit_bytes=None, mem_high_bytes=None)
            self._write(m, target_limits(m.user, applied, self.period_us, self.oom_hold))
        m.applied = applied
        m.restore_pending = False
        self._mark(m)
        return applied, time.perf_counter() - t0

    def _mark(self, m: Managed) -> None:
        if m.restore_pending or not m.applied.is_user:
            self.held.add(m.container_id)
        else:
            self.held.discard(m.container_id)

    def _restore(self, m: Managed) -> str:
        """Put the user's limits back: "restored", "gone", or, when the kernel refused part of
        them or a write failed, "pending" / "error: ..." with the restore left pending, so that
        ``retry_restores`` tries again every tick until they are in place."""
        try:
            try:
                self._write(m, m.user)
                result = "restored"
            except ValueError:
                # memory still above the user's limit + headroom: restore CPU now, memory later
                cur = self._cg(m).read_limits()
                self._write(
                    m,
                    dataclasses.replace(
                        m.user,
                        mem_limit_bytes=cur.mem_limit_bytes,
                        mem_high_bytes=cur.mem_high_bytes,
                    ),
                )
                result = "pending"
        except cgroups.CgroupGone:
            return "gone"
        except (ValueError, cgroups.CgroupError) as exc:
            if isinstance(exc, cgroups.CgroupError):
                m.cg = None  # reopened on the next try
            result = f"error: {exc}"
        m.owner = None
        m.restore_pending = result != "restored"
        if not m.restore_pending:
            m.applied = USER_TARGET
        self._mark(m)
        return result

    def restore(self, container_id: str) -> str:
        m = self.managed.get(container_id)
        if m is None:
            return "unknown"
        return self._restore(m)

    def release(self, container_id: str) -> None:
        """The owning decision ended but its limits stay (restore_on_end = false). A hold goes:
        nobody gives memory back to a container no decision watches, so it is killed as before."""
        m = self.managed.get(container_id)
        if m is None:
            return
        m.owner = None
        w = m.written
        if w is not None and w.mem_oom_hold and not m.user.mem_oom_hold:
            try:
                self._write(m, dataclasses.replace(w, mem_oom_hold=False))
            except (ValueError, cgroups.CgroupError) as exc:
                log.warning(
                    "could not lift the OOM hold",
                    extra={"container": container_id, "reason": str(exc)},
                )

    def retry_restores(self) -> dict[str, str]:
        return {
            cid: self._restore(m)
            for cid in list(self.held)
            if (m := self.managed[cid]).restore_pending and m.owner is None
        }

    def restore_all(self, live: set[str] | None = None) -> dict[str, str]:
        """Return every container no live decision owns to its user limits (shutdown: all)."""
        return {
            cid: self._restore(self.managed[cid])
            for cid in restore_plan(self.managed, live or set())
        }

    def close(self) -> None:
        for m in self.managed.values():
            if m.cg is not None:
                m.cg.close()
