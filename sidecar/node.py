"""The node: runtimes, sampler, engine, actuator, spool, models and metrics working together.

Everything here runs on the event loop thread (one owner for every cgroup object); nothing
blocks longer than a few cgroup writes (the runtimes' listings after start-up run in a worker
thread: ``relist``). The HTTP handlers and the sampling loop call these methods; the daemon
wires them (``sidecar.daemon``). Kept apart from the pure engine so the decision logic stays
testable without I/O, and from the daemon so it is testable without sockets.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Container, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sidecar import cgroups, profiles
from sidecar.actuator import Actuator
from sidecar.config import Config
from sidecar.engine import (
    OOM_HOLD,
    THROTTLED,
    USER_TARGET,
    Engine,
    EngineError,
    GiveBack,
    InferredEnd,
    InferredStart,
    Invocation,
    OomKill,
    UnknownContainer,
    effective,
)
from sidecar.metrics import Metrics
from sidecar.models import ModelManager
from sidecar.runtimes.base import ContainerRef, Runtime, RuntimeEvent, UserSize
from sidecar.sampler import Sampler, TickResult
from sidecar.spool import Spool

log = logging.getLogger("faasrm.node")
TRIPS = ("first", "failure", "rising")


@dataclass
class StartResult:
    invocation: Invocation
    applied: bool
    actuation_s: float
    error: str | None = None


class Node:
    def __init__(
        self,
        cfg: Config,
        *,
        runtimes: list[Runtime],
        actuator: Actuator,
        models: ModelManager,
        spool: Spool,
        metrics: Metrics,
        host_cores: float,
        host_mem_mb: float,
    ) -> None:
        self.cfg = cfg
        self.runtimes = runtimes
        self.actuator = actuator
        self.models = models
        self.spool = spool
        self.metrics = metrics
        self.grid = cfg.grid
        self.sampler = Sampler(self._open, cfg.sampler.slow_every)
        self.engine = Engine(
            self.grid,
            node_id=cfg.node,
            host_cores=host_cores,
            host_mem_mb=host_mem_mb,
            scorer=models.get,
            fallback=models.fallback.scorer,
            safeguard=cfg.safeguard,
            reward=cfg.reward,
            actuation=cfg.actuation,
            boundaries=cfg.boundaries,
            tick_s=cfg.sampler.tick_s,
            trace_size=cfg.debug.trace_size,
        )
        self._runtime_of: dict[str, Runtime] = {}
        """Which runtime claimed each container (it opens the container's cgroup)."""
        self._owned: dict[str, str] = {}
        """Container -> the invocation a runtime's boundary events started (only those end it)."""
        self.first_tick_done = False
        self.last_tick_s = math.nan
        self.last_discover_s = -math.inf
        self._relisting: asyncio.Task[None] | None = None
        """The periodic relist under way (``relist``), cancelled at shutdown."""
        self.recovered: dict[str, str] = {}
        self._spool_dropped_seen = spool.dropped
        self._spool_corrupt_seen = 0
        self._spool_metrics()  # the torn tails the spool found at start-up
        self.record_observers: list[Any] = []
        """Callables given every finished invocation's trajectory record (the model poller)."""

    # ------------------------------------------------------------------------ profiles
    def load_profiles(self) -> int:
        """Start-up: what an earlier run learned about each function (``sidecar.profiles``);
        the number of functions taken."""
        path = self.cfg.actuation.profiles_path
        if path is None:
            return 0
        eng = self.engine
        functions = profiles.load(path, self.grid, eng.clock() - eng.wall())
        eng.remember(functions)
        self.metrics.profiled_functions.set(len(functions))
        if functions:
            log.info(
                "function profiles restored", extra={"functions": len(functions), "path": str(path)}
            )
        return len(functions)

    def profiles_snapshot(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """Every function's profile, or those of ``names`` that the node knows
        (``sidecar.profiles.snapshot``: the file's format, times in Unix seconds)."""
        eng = self.engine
        stats = eng.stats if names is None else {n: eng.stats[n] for n in names if n in eng.stats}
        return profiles.snapshot(stats, eng.guards, self.grid, eng.wall() - eng.clock())

    def save_profiles(self, data: dict[str, Any] | None = None) -> bool:
        """Write the profiles (``data``: a snapshot taken on the event loop, for a save from a
        worker thread; else taken now). False, logged and counted when it cannot be written: a
        full disk costs the profiles, never the daemon."""
        path = self.cfg.actuation.profiles_path
        if path is None:
            return True
        data = self.profiles_snapshot() if data is None else data
        try:
            profiles.save(path, data)
        except Exception as exc:  # a full disk, or a bug: logged, counted, never fatal
            log.error("function profiles not saved", extra={"path": str(path), "reason": str(exc)})
            self.metrics.profile_saves.labels("error").inc()
            return False
        self.metrics.profile_saves.labels("ok").inc()
        self.metrics.profiled_functions.set(len(data["functions"]))
        return True

    def _open(self, ref: ContainerRef) -> cgroups.Cgroup:
        return self._runtime_of[ref.id].open(ref)

    # ------------------------------------------------------------------------ containers
    def recover(self) -> dict[str, str]:
        self.recovered = self.actuator.recover()
        for outcome in self.recovered.values():
            self.metrics.restores.labels(outcome.split(":")[0]).inc()
        if self.recovered:
            log.warning(
                "restored containers left by a previous run", extra={"containers": self.recovered}
            )
        return self.recovered

    def _claim(
        self,
        runtime: Runtime,
        ref: ContainerRef,
        ids: Container[str],
        places: set[tuple[int, str]],
    ) -> bool:
        """First claim wins: a container id in ``ids`` or a cgroup in ``places`` stays with the
        runtime that listed it first (e.g. ``docker/<id>`` under a cgroupfs parent stays
        Docker's). On success the cgroup joins ``places`` and ``runtime`` opens it."""
        if ref.id in ids or ref.cgroup_key in places:
            return False
        places.add(ref.cgroup_key)
        self._runtime_of[ref.id] = runtime
        return True

    @staticmethod
    def _list(
        runtimes: list[Runtime], full: bool
    ) -> list[tuple[Runtime, list[ContainerRef]]] | None:
        """Each runtime's listing, in order (``full``: ``discover``, else the cheaper
        ``relist``); None if one failed (logged). Blocking: a Docker API call can take seconds."""
        out = []
        for rt in runtimes:
            try:
                out.append((rt, rt.discover() if full else rt.relist()))
            except Exception as exc:
                log.error("discovery failed", extra={"runtime": rt.name, "reason": str(exc)})
                return None
        return out

    def sync_containers(self, full: bool = True) -> None:
        """Re-list every runtime now (start-up): adopt new containers, restore and forget
        vanished ones (``_settle``)."""
        self._settle(self._list(self.runtimes, full), self._known())

    async def relist(self, full: bool = False) -> None:
        """The periodic safety net for missed events (``full``: a reload's ``discover``): the
        runtimes' listing in a worker thread, so a slow listing stalls neither the sampling loop
        nor the hook API, settled on the loop. Events may have added containers meanwhile: only
        those known before can be forgotten."""
        runtimes, known = self.runtimes, self._known()
        try:
            listings = await asyncio.to_thread(self._list, runtimes, full)
            if runtimes is self.runtimes:  # else a reload replaced them, and listed its own
                self._settle(listings, known)
        except Exception:  # the next interval tries again; the logs say what happened
            log.exception("relist failed")
            self.last_discover_s = time.monotonic()

    def _spool_metrics(self) -> None:
        """The spool's counters into the metrics: what grew since last time (its dropped count
        is kept across restarts, a metric counts this run's)."""
        st, m = self.spool.stats(), self.metrics
        m.spool_dropped.inc(st.dropped - self._spool_dropped_seen)
        m.spool_corrupt.inc(st.corrupt - self._spool_corrupt_seen)
        self._spool_dropped_seen, self._spool_corrupt_seen = st.dropped, st.corrupt
        m.spool_bytes.set(st.bytes)

    def _known(self) -> set[str]:
        """Every container the node manages or the state file holds."""
        return {*self.engine.containers, *self.actuator.managed}

    def _settle(
        self, listings: list[tuple[Runtime, list[ContainerRef]]] | None, known: set[str]
    ) -> None:
        """Adopt what the runtimes listed; restore and forget those of ``known`` none lists.
        Runtimes are in order, most specific first, and the first to list a container claims it
        (``_claim``). No listings (one failed): nothing forgotten, retried at the next interval."""
        self.last_discover_s = time.monotonic()
        if listings is None:
            return  # never forget containers because one listing failed
        seen: dict[str, ContainerRef] = {}
        claimed: set[tuple[int, str]] = set()
        for rt, refs in listings:
            for ref in refs:
                if self._claim(rt, ref, seen, claimed):
                    seen[ref.id] = ref
        added = False
        for cid, ref in seen.items():
            if cid not in self.engine.containers:
                added |= self.add(ref, save=False)
            else:
                self._update(ref)
        if added:
            self.actuator.save()  # one fsync for the whole batch, before any decision can apply
        for cid in [c for c in self.engine.containers if c in known and c not in seen]:
            self.remove(cid, restore=True)
        # containers of the state file that no runtime lists any more: restore and forget them
        for cid in [c for c in self.actuator.managed if c in known and c not in seen]:
            self.actuator.forget(cid, restore=True)
        self.metrics.managed.set(len(self.engine.containers))

    def add(self, ref: ContainerRef, save: bool = True) -> bool:
        try:
            cg = self.sampler.track(ref)
            self.actuator.adopt(ref, cg, save=save)
        except (cgroups.CgroupError, ValueError) as exc:
            log.warning("cannot manage container", extra={"container": ref.id, "reason": str(exc)})
            self.sampler.untrack(ref.id)
            return False
        self.engine.add_container(ref)
        log.info(
            "managing container",
            extra={
                "container": ref.id,
                "function": ref.function,
                "user_cpu_cores": ref.user.cpu_cores,
                "user_mem_bytes": ref.user.mem_bytes,
            },
        )
        return True

    def _update(self, ref: ContainerRef) -> None:
        """A configured user size changed (e.g. on reload): persist it, apply it when idle.

        Sizes read from the cgroup's own limits are not re-read: while a decision owns the
        container those limits are the decision's, not the user's (the state file keeps the truth).
        """
        c = self.engine.containers[ref.id]
        if ref is c.ref or ref.user == c.ref.user:  # the relist's own ref: nothing changed
            return
        if ref.labels.get("user_from") in ("limits", "mixed"):
            return
        try:
            self.actuator.set_user(ref.id, ref.user)
        except ValueError as exc:
            log.warning("user size refused", extra={"container": ref.id, "reason": str(exc)})
            return
        self.engine.add_container(ref)
        if c.active is None:
            self.actuator.restore(ref.id)
        log.info(
            "user size changed",
            extra={
                "container": ref.id,
                "cpu_cores": ref.user.cpu_cores,
                "mem_bytes": ref.user.mem_bytes,
            },
        )

    def remove(self, cid: str, restore: bool) -> None:
        inv = self.engine.remove_container(cid)
        if inv is not None:
            self._finish(inv.id, "lost", None, usage=None, restore=False)
        result = self.actuator.forget(cid, restore=restore)
        self.sampler.untrack(cid)
        self._runtime_of.pop(cid, None)
        self._owned.pop(cid, None)
        if restore:
            self.metrics.restores.labels(
                result.split(":")[0] if result != "unknown" else "gone"
            ).inc()
        log.info("forgot container", extra={"container": cid, "restore": result})

    def on_runtime_event(self, runtime: Runtime, ev: RuntimeEvent) -> None:
        """Apply one change a runtime pushed.

        ``added`` claims the container unless it is known or its cgroup is another runtime's
        (the next full listing settles such a conflict). Boundaries (Docker unpause/pause)
        start and end an invocation only when no other source owns the container's current
        one: an invoker that calls the hook API as well is not double-counted, and a pause ends
        only what an unpause started.
        """
        cid = ev.container_id
        if ev.kind == "added" and ev.ref is not None:
            taken = {c.ref.cgroup_key for c in self.engine.containers.values()}
            if self._claim(runtime, ev.ref, self.engine.containers, taken) and not self.add(ev.ref):
                self._runtime_of.pop(cid, None)
        elif ev.kind == "removed":
            if cid in self.engine.containers:
                self.remove(cid, restore=False)
        elif ev.kind == "invocation_start":
            c = self.engine.containers.get(cid)
            if c is not None and c.active is None:
                self._owned[cid] = self.start(cid).invocation.id
        elif ev.kind == "invocation_end":
            c = self.engine.containers.get(cid)
            inv_id = self._owned.pop(cid, None)
            if c is not None and c.active is not None and c.active.id == inv_id:
                self.end(inv_id)

    # ------------------------------------------------------------------------ invocations
    def _usage(self, cid: str, gone_ok: bool = True) -> cgroups.Usage | None:
        """The container's usage now; None if unreadable. ``gone_ok=False``: CgroupGone when its
        cgroup was removed, or removed and made again (the kept files answer ENODEV)."""
        cg = self.sampler.cgroup(cid)
        if cg is None:
            return None
        try:
            return cg.read_usage()
        except cgroups.CgroupGone:
            if not gone_ok:
                raise
            return None
        except cgroups.CgroupError:
            return None

    def start(
        self,
        container_id: str,
        *,
        function: str | None = None,
        user: UserSize | None = None,
        pending: int = 0,
        input_size: float | None = None,
        invocation_id: str | None = None,
        inferred: bool = False,
    ) -> StartResult:
        if container_id not in self.engine.containers:
            raise UnknownContainer(f"unknown container {container_id!r}")
        if user is not None:  # saved only once the start is taken (below)
            try:
                self.actuator.check_user(container_id, user)
            except ValueError as exc:
                raise EngineError(f"'user' cannot be written to this container: {exc}") from None
        try:
            usage = self._usage(container_id, gone_ok=False)
        except cgroups.CgroupGone as exc:
            # deleted, or restarted under the same name: every handle is the old cgroup's, so
            # nothing is decided on them; the next listing adopts a new cgroup afresh
            self.remove(container_id, restore=False)
            raise UnknownContainer(f"container {container_id!r} is gone: {exc}") from None
        cg = self.sampler.cgroup(container_id)
        if cg is not None:
            try:
                cg.reset_peak()
            except cgroups.CgroupError:
                pass
        inv = self.engine.start(
            container_id,
            function=function,
            user=user,
            pending=pending,
            input_size=input_size,
            invocation_id=invocation_id,
            inferred=inferred,
            usage=usage,
        )
        if user is not None:  # the actuator compares it with the size it saved
            self.actuator.set_user(container_id, user)  # persisted before any write
        m = self.metrics
        m.decision_latency.observe(inv.decision_s)
        if inv.fallback is not None:
            m.model_failures.inc()
            log.error("model failed, the fallback decided", extra={"reason": inv.fallback})
            if self.engine.consecutive_model_failures >= self.cfg.model.max_runtime_failures:
                if self.models.rollback(
                    f"{self.engine.consecutive_model_failures} failed decisions"
                ):
                    m.model_loads.labels("rollback").inc()
                    m.set_policy(self.models.current.id)
                    self.engine.consecutive_model_failures = 0
        if inv.guard.cpu_mode in TRIPS or inv.guard.mem_mode in TRIPS:
            m.safeguard_trips.labels(
                inv.guard.cpu_mode if inv.guard.cpu_mode in TRIPS else inv.guard.mem_mode
            ).inc()
        kind = inv.trace["kind"]
        if kind == "harvested":
            m.harvested.labels(m.function_label(inv.function)).inc()
        elif kind == "accelerated":
            m.accelerated.labels(m.function_label(inv.function)).inc()
        result = self._apply(inv, inv.target)
        m.active.set(len(self.engine.invocations))
        self._update_ratio()
        return result

    def _apply(self, inv: Invocation, target: Any, give_back: bool = False) -> StartResult:
        """Write ``target`` for ``inv``: its start's decision, or a ``give_back`` of a run that
        already holds its decision's limits (a failed write does not undo that part of its
        history: ``_write_failed``)."""
        resources = self._resources(inv, target)
        try:
            applied, took = self.actuator.apply(inv.container_id, target, inv.id)
        except cgroups.CgroupGone as exc:
            for r in resources:
                self.metrics.limit_writes.labels(r, "error").inc()
            self._write_failed(inv, give_back)
            return StartResult(inv, False, 0.0, f"container vanished: {exc}")
        except (cgroups.CgroupError, ValueError) as exc:
            for r in resources:
                self.metrics.limit_writes.labels(r, "error").inc()
            log.error(
                "actuation failed, restoring",
                extra={"container": inv.container_id, "reason": str(exc)},
            )
            self.actuator.restore(inv.container_id)
            self._write_failed(inv, give_back)
            return StartResult(inv, False, 0.0, str(exc))
        if applied != target:
            self.metrics.limit_writes.labels("memory", "refused").inc()
            inv.target = applied
            cores, mem = effective(inv.user, applied)
            inv.trace["chosen"].update(cpu_cores=cores, mem_bytes=mem, memory_floor=True)
        for r in self._resources(inv, applied):
            self.metrics.limit_writes.labels(r, "ok").inc()
        self.metrics.actuation_latency.observe(took)
        inv.trace["actuation_us"] = round(took * 1e6, 1)
        inv.trace["applied"] = True
        return StartResult(inv, True, took)

    @staticmethod
    def _write_failed(inv: Invocation, give_back: bool) -> None:
        """The limits could not be written (or the container vanished); one still there goes
        back to its user's size, the restore retried every tick until in place. A start's
        decision never took effect: the run holds the user's size, as its trace says, and its
        record earns the policy no credit (``Engine.end``). A give-back's run held its decision
        until now: its trace keeps it, and its give-back says the user's size from now on."""
        inv.target = USER_TARGET
        cores, mem = effective(inv.user, USER_TARGET)
        if give_back:
            last = inv.trace["give_backs"][-1]["t_monotonic"]
            for gb in inv.trace["give_backs"]:  # this give-back's entries, one per reason
                if gb["t_monotonic"] == last:
                    gb.update(new_cpu_cores=cores, new_mem_bytes=mem)
            return
        inv.trace["chosen"].update(cpu_cores=cores, mem_bytes=mem)
        inv.trace["kind"] = "user"
        inv.trace["applied"] = False

    @staticmethod
    def _resources(inv: Invocation, target: Any) -> list[str]:
        out = []
        if target.cpu_cores is not None or target.cpu_weight is not None:
            out.append("cpu")
        if target.mem_limit_bytes is not None or target.mem_high_bytes is not None:
            out.append("memory")
        return out

    def end(
        self, invocation_id: str, outcome: str = "success", duration_s: float | None = None
    ) -> Any:
        inv = self.engine.invocations.get(invocation_id)
        usage = self._usage(inv.container_id) if inv is not None else None
        return self._finish(invocation_id, outcome, duration_s, usage, restore=True)

    def _finish(
        self,
        invocation_id: str,
        outcome: str,
        duration_s: float | None,
        usage: cgroups.Usage | None,
        restore: bool,
        learn: bool = True,
    ) -> Any:
        ended = self.engine.end(
            invocation_id, outcome, duration_s=duration_s, usage=usage, learn=learn
        )
        inv = ended.invocation
        self.metrics.invocations.labels(ended.outcome).inc()
        if ended.oom is not None:
            self._oom(ended.oom)
        if (share := inv.trace["throttled_share"]) is not None:
            self.metrics.throttled_ratio.observe(share)
        try:
            self.spool.append(ended.record)
        except (OSError, ValueError) as exc:
            log.error("cannot spool a trajectory record", extra={"reason": str(exc)})
        for observe in self.record_observers:
            try:
                observe(ended.record)
            except Exception:
                log.exception("record observer failed")
        self._spool_metrics()
        if restore and inv.container_id in self.actuator.managed:
            if self.cfg.actuation.restore_on_end:
                result = self.actuator.restore(inv.container_id)
                if result != "restored":
                    self.metrics.restores.labels(result.split(":")[0]).inc()
            else:
                self.actuator.release(inv.container_id)
        self.metrics.active.set(len(self.engine.invocations))
        self._update_ratio()
        return ended

    def _oom(self, kill: OomKill) -> None:
        """Count kills once, whoever reported them first: a tick, or the end of the killed run
        (which may come before any tick read the counter, the run gone by then)."""
        self.metrics.oom_kills.inc(kill.kills)
        if kill.harvested:
            self.metrics.harvested_oom_kills.inc(kill.kills)
        log.warning(
            "OOM kill in a managed container",
            extra={"container": kill.container_id, "invocation": kill.invocation_id},
        )

    def _update_ratio(self) -> None:
        alloc = user = 0.0
        for inv in self.engine.invocations.values():
            alloc += effective(inv.user, inv.target)[0]
            user += inv.user.cpu_cores
        self.metrics.cpu_limit_ratio.set(alloc / user if user else 1.0)

    # ------------------------------------------------------------------------ the tick
    def tick(self) -> None:
        t0 = time.perf_counter()
        now = time.monotonic()
        relisting = self._relisting is not None and not self._relisting.done()
        if now - self.last_discover_s >= self.cfg.sampler.discover_every_s and not relisting:
            self._relisting = asyncio.get_running_loop().create_task(self.relist())
        self._process(self.sampler.tick(self._hot(), self._watched()))
        m = self.metrics
        for result in self.actuator.retry_restores().values():
            if result == "restored":
                m.restores.labels("restored").inc()
        self.first_tick_done = True
        self.last_tick_s = time.monotonic()
        m.tick_duration.observe(time.perf_counter() - t0)

    def tick_oom(self) -> None:
        """The kernel signalled an OOM between ticks: sample those containers now, so a task
        held at its harvested limit gets its memory back at once (``Sampler.tick_oom``)."""
        self._process(self.sampler.tick_oom())

    def _process(self, res: TickResult) -> None:
        """A sampling round's samples through the engine, its effects applied."""
        m = self.metrics
        m.samples.inc(len(res.samples))
        for cid in res.gone:
            m.sample_errors.labels("gone").inc()
            self.remove(cid, restore=False)
        for cid, reason in res.errors.items():
            m.sample_errors.labels("io").inc()
            log.warning("sample failed", extra={"container": cid, "reason": reason})
        for effect in self.engine.on_samples(res.samples):
            self._effect(effect)

    def _hot(self) -> set[str]:
        """The containers sampled every tick: those running an invocation or holding a
        decision's limits (a give-back or an OOM must be seen within a tick), and, with inferred
        boundaries, every container no hook reports (its next invocation is a CPU edge). The
        others, idle at their user's size, are read on their slow tick (``sampler.slow_every``)."""
        hot = {inv.container_id for inv in self.engine.invocations.values()}
        hot.update(self.actuator.held)
        if self.cfg.boundaries.infer:
            hot.update(cid for cid, c in self.engine.containers.items() if not c.hooked)
        return hot

    def _watched(self) -> set[str]:
        """The containers whose throttling counters are read every tick: those running an
        invocation with a harvested CPU quota (the throttle give-back)."""
        return {inv.container_id for inv in self.engine.invocations.values() if inv.cpu_harvested}

    def _effect(self, effect: Any) -> None:
        m = self.metrics
        if isinstance(effect, GiveBack):
            inv = self.engine.invocations.get(effect.invocation_id)
            if inv is None:
                return
            for r, why in zip(effect.resources, effect.reasons, strict=True):
                m.give_backs.labels(r).inc()
                if why == THROTTLED:
                    m.throttle_raises.inc()
                elif why == OOM_HOLD:
                    m.oom_holds.inc()
            self._apply(inv, effect.target, give_back=True)
            log.info(
                "gave back",
                extra={
                    "container": effect.container_id,
                    "resources": list(effect.resources),
                    "reasons": list(effect.reasons),
                },
            )
        elif isinstance(effect, OomKill):
            self._oom(effect)
        elif isinstance(effect, InferredStart):
            try:
                self.start(effect.container_id, inferred=True)
                self.engine.note_inferred_start(effect.container_id, effect.start_s)
            except EngineError:
                pass
        elif isinstance(effect, InferredEnd):
            inv = self.engine.invocations.get(effect.invocation_id)
            if inv is not None:
                self.end(
                    effect.invocation_id, "success", duration_s=max(0.0, effect.end_s - inv.start_s)
                )

    # ------------------------------------------------------------------------ shutdown, views
    def shutdown(self) -> dict[str, str]:
        if self._relisting is not None:
            self._relisting.cancel()  # its listing, if back after this, is for nobody
        for inv_id in list(self.engine.invocations):
            try:
                self._finish(inv_id, "lost", None, usage=None, restore=False, learn=False)
            except EngineError:
                pass
        results = self.actuator.restore_all()
        if all(r in ("restored", "gone") for r in results.values()):
            self.actuator.save(clean=True)  # a pending restore stays for the next start
        self.sampler.close()
        self.actuator.close()
        self.spool.close()
        return results

    def containers_view(self) -> list[dict]:
        """Every container for ``/debug/containers`` (and the page): user size, the limits in
        place (as last written or read), the latest usage (``t`` in Unix seconds), what runs."""
        out = []
        hot, watched = self._hot(), self._watched()
        wall = time.time() - time.monotonic()
        for cid, c in self.engine.containers.items():
            last = self.sampler.last(cid)
            man = self.actuator.managed.get(cid)
            lim = man.written if man else None
            now = self.sampler.history(cid, 1)
            out.append(
                {
                    "id": cid,
                    "function": c.ref.function,
                    "runtime": c.ref.runtime,
                    "cgroup_path": c.ref.cgroup_path,
                    "cgroup_version": c.ref.cgroup_version,
                    "user": {
                        "cpu_cores": c.user.cpu_cores,
                        "mem_bytes": c.user.mem_bytes,
                        "cpu_weight": c.user.cpu_weight,
                    },
                    "limits": None
                    if lim is None
                    else {
                        "cpu_cores": lim.cpu_quota_cores,
                        "cpu_period_us": lim.cpu_period_us,
                        "cpu_weight": lim.cpu_weight,
                        "mem_bytes": lim.mem_limit_bytes,
                        "mem_high_bytes": lim.mem_high_bytes,
                    },
                    "usage": None
                    if not now
                    else {"t": now[0][0] + wall, "cpu_cores": now[0][1], "mem_bytes": now[0][2]},
                    "invocation": c.active.id if c.active else None,
                    "kind": c.active.trace["kind"] if c.active else None,
                    "every_tick": cid in hot,
                    "throttle_watched": cid in watched,
                    "hooked": c.hooked,
                    "restore_pending": bool(man and man.restore_pending),
                    "last_sample": None
                    if last is None
                    else {
                        "cpu_usage_s": last.cpu_usage_s,
                        "mem_bytes": last.mem_bytes,
                        "oom_kills": last.oom_kills,
                        "nr_periods": last.nr_periods,
                        "nr_throttled": last.nr_throttled,
                    },
                }
            )
        return out


NODE = web.AppKey("node", Node)
