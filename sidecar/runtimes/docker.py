"""Docker runtime: OpenWhisk action containers discovered through the Docker Engine API.

What this adapter answers (and nothing more: usage is read from cgroup files by the sampler):

* **Which containers.** Only OpenWhisk action containers, recognised by the name the invoker gives
  them, ``wsk<invoker>_<n>_<namespace>_<action>`` (e.g. ``wsk0_12_guest_hello``), or any
  container that carries the label ``faasrm.function`` (an explicit opt-in; the label also
  overrides the name-derived function). Only running or paused containers are listed: a created
  or exited container has no cgroup.
* **Which function.** ``"<namespace>/<action>"``. OpenWhisk builds the name from the namespace and
  action after deleting every character that is not a letter, digit or ``_`` (so ``img-resize``
  becomes ``imgresize`` and ``pkg/act`` becomes ``pkgact``), which makes the namespace/action
  split ambiguous when either contains ``_``. :func:`parse_container_name` splits at the first
  ``_`` after the sequence number (the namespace is one token: ``guest``, ``whisk_system`` would be
  mis-split) unless the runtime is told its namespaces (``namespaces=``), in which case the
  longest known namespace that prefixes the rest wins. The mapping is deterministic, so a
  function's identity is stable across its containers even when the split is wrong; two actions
  whose sanitised names collide share an identity unless labelled with ``faasrm.function``.
  Prewarmed stem-cell containers are named ``wsk0_3_prewarm_<kind>`` and keep that name after
  OpenWhisk assigns them an action: they map to ``prewarm/<kind>`` (see :attr:`WskName.prewarm`).
* **The user's size** from ``HostConfig`` (what ``docker inspect`` reports: the user's setting,
  never changed by the daemon's direct cgroup writes), see :func:`user_size`.
* **Where its cgroup is**, from ``docker info`` (``CgroupDriver``, ``CgroupVersion``) and the
  container's ``HostConfig.CgroupParent``, verified on disk, falling back to ``/proc/<pid>/cgroup``
  of the container's init process, see :func:`cgroup_path`.
* **Invocation boundaries.** OpenWhisk pauses an idle container and unpauses it for an activation,
  so ``unpause`` -> ``invocation_start`` and ``pause`` -> ``invocation_end``; ``start`` ->
  ``added``; ``die``/``destroy`` -> ``removed`` (once per container). After the event stream
  reconnects, a listing finds what it missed (``_resync``): a pause among it still ends the
  invocation.

This adapter never writes to Docker: the daemon actuates through cgroup files (with the Python SDK
a container started with ``--cpus`` refuses ``cpu_quota`` updates, and ``docker update`` costs
13-22 ms a call).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sidecar.cgroups import DEFAULT_ROOT, shares_to_weight, v2_base
from sidecar.runtimes.base import ContainerRef, RuntimeBase, RuntimeEvent, UserSize

log = logging.getLogger(__name__)

FUNCTION_LABEL = "faasrm.function"
RUNTIME_NAME = "docker"
DOCKER_DEFAULT_SHARES = 1024  # what a CpuShares of 0 means
DEFAULT_CPU_PERIOD_US = 100_000

# wsk<invoker>_<n>_<namespace>_<action>. <invoker> is the invoker's instance number, optionally
# preceded by its unique name (letters/digits: OpenWhisk sanitises it too); <n> a counter.
_WSK_NAME = re.compile(r"^wsk(?P<invoker>[A-Za-z0-9]*)_(?P<seq>\d+)_(?P<rest>.+)$")
_PREWARM_NAMESPACE = "prewarm"

_EVENT_KINDS: dict[str, Literal["added", "removed", "invocation_start", "invocation_end"]] = {
    "start": "added",
    "die": "removed",
    "destroy": "removed",
    "pause": "invocation_end",
    "unpause": "invocation_start",
}


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class WskName:
    """The parts of an OpenWhisk container name."""

    invoker: str
    seq: int
    namespace: str
    action: str

    @property
    def function(self) -> str:
        return f"{self.namespace}/{self.action}"

    @property
    def prewarm(self) -> bool:
        """A prewarmed stem cell: ``action`` is the runtime kind, not the action it will run."""
        return self.namespace == _PREWARM_NAMESPACE


def parse_container_name(name: str, namespaces: Iterable[str] = ()) -> WskName | None:
    """Parse ``wsk<invoker>_<n>_<namespace>_<action>``; None if the name is not OpenWhisk's.

    The leading ``/`` of Docker API names is ignored. ``namespaces``: known namespace names (as
    they appear in container names, i.e. sanitised); the longest one that is followed by ``_`` and
    a non-empty action wins. Otherwise the namespace is the first ``_``-separated token and the
    action is everything after it (it may contain ``_`` and ``-``). Empty parts -> None.
    """
    m = _WSK_NAME.match(name.lstrip("/"))
    if m is None:
        return None
    rest = m["rest"]
    for ns in sorted((n for n in namespaces if n), key=len, reverse=True):
        if rest.startswith(ns + "_") and len(rest) > len(ns) + 1:
            namespace, action = ns, rest[len(ns) + 1 :]
            break
    else:
        namespace, sep, action = rest.partition("_")
        if not sep:
            return None
    if not namespace or not action:
        return None
    return WskName(invoker=m["invoker"], seq=int(m["seq"]), namespace=namespace, action=action)


def function_of(
    name: str, labels: Mapping[str, str] | None, namespaces: Iterable[str] = ()
) -> str | None:
    """The function a container runs: the ``faasrm.function`` label if set and non-empty, else the
    OpenWhisk name's ``<namespace>/<action>``; None = not a container this runtime manages."""
    label = (labels or {}).get(FUNCTION_LABEL, "").strip()
    if label:
        return label
    parsed = parse_container_name(name, namespaces)
    return parsed.function if parsed else None


def user_size(
    host_config: Mapping[str, Any],
    *,
    cores_per_share: float,
    host_cpus: float,
    host_mem_bytes: int,
) -> UserSize:
    """The user's CPU and memory setting from a container's ``HostConfig``.

    * memory: ``Memory`` bytes; 0 (unlimited) -> ``host_mem_bytes``.
    * cores, first that is set: ``NanoCpus / 1e9`` (``--cpus``); ``CpuQuota / CpuPeriod``
      (``--cpu-quota``, period default 100 ms); ``CpuShares * cores_per_share``
      (``--cpu-shares``, which is what OpenWhisk sets); else ``host_cpus`` (unlimited). Cores are
      capped at ``host_cpus``.
    * weight: ``shares_to_weight(CpuShares)`` (0 means Docker's default 1024 -> weight 100).

    OpenWhisk gives each container ``shares = 1024 * memory / invoker user memory`` (minimum 2),
    so the shares of a full pool add up to 1024 and the natural ``cores_per_share`` is
    ``host_cpus / 1024``: a container holding the whole pool's memory gets every core. The
    default of :class:`DockerRuntime` is exactly that; configure it when the invoker's pool
    does not span the host.
    """
    mem = int(host_config.get("Memory") or 0)
    if mem <= 0:
        mem = int(host_mem_bytes)
    shares = int(host_config.get("CpuShares") or 0)
    nano = int(host_config.get("NanoCpus") or 0)
    quota = int(host_config.get("CpuQuota") or 0)
    period = int(host_config.get("CpuPeriod") or 0) or DEFAULT_CPU_PERIOD_US
    if nano > 0:
        cores = nano / 1e9
    elif quota > 0:
        cores = quota / period
    elif shares > 0:
        cores = shares * cores_per_share
    else:
        cores = float(host_cpus)
    cores = min(cores, float(host_cpus))
    weight = shares_to_weight(shares if shares > 0 else DOCKER_DEFAULT_SHARES)
    return UserSize(cpu_cores=cores, mem_bytes=mem, cpu_weight=weight)


def _expand_systemd_slice(slice_name: str) -> str:
    """systemd nests slices by dashes: ``a-b-c.slice`` -> ``a.slice/a-b.slice/a-b-c.slice``."""
    if slice_name in ("", "-.slice"):
        return ""
    if not slice_name.endswith(".slice"):
        raise ValueError(f"not a systemd slice: {slice_name!r}")
    stem = slice_name[: -len(".slice")]
    parts = stem.split("-")
    if any(not p for p in parts):
        raise ValueError(f"invalid systemd slice name: {slice_name!r}")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def cgroup_rel_path(container_id: str, driver: str, cgroup_parent: str = "") -> str:
    """The container's cgroup relative to the hierarchy root (no leading ``/``).

    cgroupfs driver: ``<parent or docker>/<id>``; systemd driver:
    ``<expanded parent slice or system.slice>/docker-<id>.scope``. The same relative path is
    used under every v1 controller and under the v2 unified mount.
    """
    if driver == "systemd":
        parent = cgroup_parent.strip("/") or "system.slice"
        # A systemd parent is a slice name ("my-app.slice"); tolerate an already-expanded path.
        if "/" not in parent:
            parent = _expand_systemd_slice(parent)
        return "/".join(p for p in (parent, f"docker-{container_id}.scope") if p)
    if driver != "cgroupfs":
        raise ValueError(f"unknown Docker cgroup driver {driver!r}")
    parent = cgroup_parent.strip("/") or "docker"
    return f"{parent}/{container_id}"


def cgroup_path(
    container_id: str,
    driver: str,
    version: int,
    cgroup_parent: str = "",
    root: str = DEFAULT_ROOT,
) -> str:
    """What :class:`ContainerRef` stores: v1 the relative path (``docker/<id>``), v2 the absolute
    directory under the unified mount (``/sys/fs/cgroup/system.slice/docker-<id>.scope``)."""
    rel = cgroup_rel_path(container_id, driver, cgroup_parent)
    if version == 1:
        return rel
    return os.path.join(v2_base(root) or root, rel)


def cgroup_exists(path: str, version: int, root: str = DEFAULT_ROOT) -> bool:
    """v1: the directory exists under the cpu and memory hierarchies; v2: the directory exists."""
    if version == 1:
        return all(os.path.isdir(os.path.join(root, c, path)) for c in ("cpu", "memory"))
    return os.path.isdir(path)


def parse_proc_cgroup(text: str, version: int, root: str = DEFAULT_ROOT) -> str | None:
    """The cgroup path (in :func:`cgroup_path`'s form) from a ``/proc/<pid>/cgroup`` text.

    v1 lines look like ``4:memory:/docker/<id>`` (controllers may be joined: ``cpu,cpuacct``);
    the memory controller's path is used. v2 is the ``0::/path`` line.
    """
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not hier or not path:
            continue
        if version == 1 and "memory" in controllers.split(","):
            return path.strip("/")
        if version == 2 and hier == "0" and controllers == "":
            return os.path.join(v2_base(root) or root, path.strip("/"))
    return None


# --------------------------------------------------------------------------- the runtime


class _Stop:
    """Sentinel the event thread puts on the queue when it ends."""


class DockerRuntime(RuntimeBase):
    """Discovers OpenWhisk containers through the Docker Engine API; see the module docstring.

    ``base_url``: e.g. ``unix:///var/run/docker.sock``; None -> ``docker.from_env()`` (honours
    ``DOCKER_HOST``). ``cores_per_share``: cores per CPU share for containers sized only by
    ``--cpu-shares`` (default ``host_cpus / 1024``, see :func:`user_size`). ``namespaces``: known
    OpenWhisk namespaces for the name split. ``cgroup_root``: where cgroupfs is mounted.
    ``client_factory``: builds a ``docker.DockerClient`` (tests); one client serves discover()
    and another the event thread (the SDK's clients are not meant to be shared across threads).
    """

    name = RUNTIME_NAME

    def __init__(
        self,
        base_url: str | None = None,
        *,
        cores_per_share: float | None = None,
        namespaces: Iterable[str] = (),
        cgroup_root: str = DEFAULT_ROOT,
        timeout_s: float = 10.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.base_url = base_url
        self.namespaces = tuple(namespaces)
        self.cgroup_root = cgroup_root
        self.timeout_s = timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._client_factory = client_factory or self._default_client
        self._client = self._client_factory()
        info = self._client.info()
        self.cgroup_driver: str = info.get("CgroupDriver") or "cgroupfs"
        self.cgroup_version: Literal[1, 2] = 2 if str(info.get("CgroupVersion", "1")) == "2" else 1
        self.host_cpus: float = float(info.get("NCPU") or os.cpu_count() or 1)
        self.host_mem_bytes: int = int(info.get("MemTotal") or _host_mem_bytes())
        self.cores_per_share = (
            cores_per_share if cores_per_share is not None else self.host_cpus / 1024
        )
        self._lock = threading.Lock()
        self._known: dict[str, ContainerRef] = {}  # id -> ref, from discover() and events
        self._paused: dict[str, bool] = {}
        self._removed: OrderedDict[str, None] = OrderedDict()  # recent ids announced removed
        self._stop = threading.Event()
        self.connected = threading.Event()
        """Set while the event stream is connected (readiness; tests wait on it)."""
        self._thread: threading.Thread | None = None
        self._stream: Any = None  # the current event stream, closed by close() to unblock
        self._closed = False

    def _default_client(self) -> Any:
        import docker  # the SDK is a base dependency; imported lazily to keep start-up cheap

        if self.base_url:
            return docker.DockerClient(base_url=self.base_url, timeout=self.timeout_s)
        return docker.from_env(timeout=self.timeout_s)

    # ---------------------------------------------------------------- discovery

    def _managed_function(self, name: str, labels: Mapping[str, str] | None) -> str | None:
        return function_of(name, labels, self.namespaces)

    def _ref_from_inspect(self, attrs: Mapping[str, Any]) -> ContainerRef | None:
        """A ref from ``docker inspect`` output; None if not ours, not running or no cgroup."""
        cid: str = attrs["Id"]
        name: str = attrs.get("Name", "")
        labels: dict[str, str] = dict((attrs.get("Config") or {}).get("Labels") or {})
        function = self._managed_function(name, labels)
        if function is None:
            return None
        state = attrs.get("State") or {}
        if not state.get("Running") and not state.get("Paused"):
            return None
        host_config = attrs.get("HostConfig") or {}
        path = self._find_cgroup(cid, host_config.get("CgroupParent") or "", state.get("Pid"))
        if path is None:
            log.warning(
                "docker container %s (%s): no cgroup directory found; not managed",
                cid[:12],
                name,
            )
            return None
        size = user_size(
            host_config,
            cores_per_share=self.cores_per_share,
            host_cpus=self.host_cpus,
            host_mem_bytes=self.host_mem_bytes,
        )
        ref = ContainerRef(
            id=cid,
            function=function,
            runtime=RUNTIME_NAME,
            cgroup_path=path,
            cgroup_version=self.cgroup_version,
            user=size,
            labels=labels,
        )
        with self._lock:
            self._paused[cid] = bool(state.get("Paused"))
        return ref

    def _find_cgroup(self, cid: str, parent: str, pid: int | None) -> str | None:
        try:
            path = cgroup_path(
                cid, self.cgroup_driver, self.cgroup_version, parent, self.cgroup_root
            )
        except ValueError as exc:
            log.warning("docker container %s: %s", cid[:12], exc)
            path = None
        if path is not None and cgroup_exists(path, self.cgroup_version, self.cgroup_root):
            return path
        if pid:  # e.g. a daemon with an unusual layout: ask the kernel where the container is
            try:
                with open(f"/proc/{pid}/cgroup") as fh:
                    found = parse_proc_cgroup(fh.read(), self.cgroup_version, self.cgroup_root)
            except OSError:
                found = None
            if found and cgroup_exists(found, self.cgroup_version, self.cgroup_root):
                return found
        return None

    def _inspect(self, client: Any, cid: str) -> ContainerRef | None:
        import docker.errors

        try:
            attrs = client.api.inspect_container(cid)
        except docker.errors.NotFound:
            return None
        return self._ref_from_inspect(attrs)

    def discover(self) -> list[ContainerRef]:
        """Every running or paused OpenWhisk container (one list call + one inspect each)."""
        import docker.errors

        refs: list[ContainerRef] = []
        for summary in self._client.api.containers(all=False):  # running and paused
            names = summary.get("Names") or []
            name = names[0] if names else ""
            if self._managed_function(name, summary.get("Labels")) is None:
                continue
            try:
                ref = self._inspect(self._client, summary["Id"])
            except docker.errors.APIError as exc:
                log.warning("docker inspect %s failed: %s", summary["Id"][:12], exc)
                continue
            if ref is not None:
                refs.append(ref)
        with self._lock:
            self._known = {r.id: r for r in refs}
            self._paused = {k: v for k, v in self._paused.items() if k in self._known}
        return refs

    def relist(self) -> list[ContainerRef]:
        """The periodic safety net: one list call; only containers not known yet are inspected.

        Known containers keep their ref (their user size is read again by ``discover``, i.e. at
        start-up and on SIGHUP); the paused flag follows the listing's state.
        """
        import docker.errors

        with self._lock:
            known = dict(self._known)
        refs: list[ContainerRef] = []
        paused: dict[str, bool] = {}
        for summary in self._client.api.containers(all=False):
            cid = summary["Id"]
            ref = known.get(cid)
            if ref is None:
                names = summary.get("Names") or []
                if self._managed_function(names[0] if names else "", summary.get("Labels")) is None:
                    continue
                try:
                    ref = self._inspect(self._client, cid)
                except docker.errors.APIError as exc:
                    log.warning("docker inspect %s failed: %s", cid[:12], exc)
                    continue
                if ref is None:
                    continue
            elif "State" in summary:
                paused[cid] = summary["State"] == "paused"
            refs.append(ref)
        with self._lock:
            self._known = {r.id: r for r in refs}
            self._paused.update(paused)
            self._paused = {k: v for k, v in self._paused.items() if k in self._known}
        return refs

    def is_paused(self, container_id: str) -> bool | None:
        """Whether a known container was paused (idle between activations) when last seen."""
        with self._lock:
            return self._paused.get(container_id)

    # ---------------------------------------------------------------- events

    def _translate(self, client: Any, event: Mapping[str, Any]) -> list[RuntimeEvent]:
        """Docker event -> runtime events (usually one; ``added`` is prepended for a boundary on
        a container this runtime had not seen). Updates the known set."""
        action = str(event.get("Action") or event.get("status") or "")
        action = action.split(":", 1)[0]  # e.g. "exec_start: sh" -> "exec_start"
        kind = _EVENT_KINDS.get(action)
        if kind is None or event.get("Type", "container") != "container":
            return []
        actor = event.get("Actor") or {}
        cid: str = actor.get("ID") or event.get("id") or ""
        attrs: dict[str, str] = dict(actor.get("Attributes") or {})
        name = attrs.get("name", "")
        if not cid:
            return []
        with self._lock:
            known = self._known.get(cid)
        if known is None and self._managed_function(name, attrs) is None:
            return []  # not an OpenWhisk container (event attributes carry the labels)

        if kind == "removed":
            with self._lock:
                self._known.pop(cid, None)
                self._paused.pop(cid, None)
                if cid in self._removed:
                    return []  # die then destroy: announce once
                self._removed[cid] = None
                while len(self._removed) > 1024:
                    self._removed.popitem(last=False)
            return [RuntimeEvent("removed", cid, known)]

        if kind == "added":  # an upsert: the daemon may already have it from discover()
            ref = self._safe_inspect(client, cid)
            if ref is None:
                return []
            with self._lock:
                self._removed.pop(cid, None)  # a restarted container can be removed again
                is_new = cid not in self._known
                self._known[cid] = ref
            return [RuntimeEvent("added", cid, ref)] if is_new else []

        out: list[RuntimeEvent] = []
        if known is None:  # a boundary on a container missed so far: announce it first
            known = self._safe_inspect(client, cid)
            if known is None:
                return []
            with self._lock:
                self._removed.pop(cid, None)
                is_new = cid not in self._known
                self._known[cid] = known
            if is_new:
                out.append(RuntimeEvent("added", cid, known))
        with self._lock:
            self._paused[cid] = kind == "invocation_end"
        out.append(RuntimeEvent(kind, cid, known))
        return out

    def _safe_inspect(self, client: Any, cid: str) -> ContainerRef | None:
        try:
            return self._inspect(client, cid)
        except Exception as exc:  # noqa: BLE001 (a broken API call must not end the stream)
            log.warning("docker inspect %s failed: %s", cid[:12], exc)
            return None

    def _resync(self, client: Any) -> list[RuntimeEvent]:
        """After a reconnect: diff a fresh listing against the known set (events the daemon
        dropped while the stream was down are otherwise lost beyond its replay buffer). A known
        container now paused that was running ends its invocation: its pause was lost."""
        with self._lock:
            before = dict(self._known)
        try:
            summaries = client.api.containers(all=False)
        except Exception as exc:  # noqa: BLE001
            log.warning("docker resync listing failed: %s", exc)
            return []
        out: list[RuntimeEvent] = []
        seen: set[str] = set()
        for s in summaries:
            names = s.get("Names") or []
            if self._managed_function(names[0] if names else "", s.get("Labels")) is None:
                continue
            cid = s["Id"]
            seen.add(cid)
            if cid not in before:
                ref = self._safe_inspect(client, cid)
                if ref is not None:
                    with self._lock:
                        self._known[ref.id] = ref
                    out.append(RuntimeEvent("added", ref.id, ref))
            elif "State" in s:
                paused = s["State"] == "paused"
                with self._lock:
                    was_paused = self._paused.get(cid)
                    self._paused[cid] = paused
                if paused and was_paused is False:
                    out.append(RuntimeEvent("invocation_end", cid, before[cid]))
        for cid, ref in before.items():
            if cid not in seen:
                with self._lock:
                    self._known.pop(cid, None)
                    self._paused.pop(cid, None)
                    self._removed[cid] = None  # a replayed die/destroy must not repeat it
                out.append(RuntimeEvent("removed", cid, ref))
        return out

    def _run_events(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        """The event thread: stream, translate, push; reconnect with exponential backoff."""

        def push(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self._stop.set()

        backoff = self.backoff_initial_s
        since: str | None = None  # last event's time, to replay what a broken stream missed
        last_ns = 0
        client = None
        connected_before = False
        try:
            while not self._stop.is_set():
                try:
                    if client is None:
                        client = self._client_factory()
                    stream = client.api.events(
                        decode=True,
                        since=since,
                        filters={"type": "container", "event": list(_EVENT_KINDS)},
                    )
                    self._stream = stream
                    if self._stop.is_set():
                        break
                    self.connected.set()
                    if connected_before:
                        log.info("docker event stream reconnected")
                        for ev in self._resync(client):
                            push(ev)
                    connected_before = True
                    backoff = self.backoff_initial_s
                    for event in stream:
                        t_ns = int(event.get("timeNano") or 0)
                        if t_ns and t_ns <= last_ns:
                            continue  # replayed after a reconnect
                        if t_ns:
                            last_ns = t_ns
                            since = f"{t_ns // 10**9}.{t_ns % 10**9:09d}"
                        for ev in self._translate(client, event):
                            push(ev)
                        if self._stop.is_set():
                            break
                    if not self._stop.is_set():
                        log.warning("docker event stream ended; reconnecting")
                except Exception as exc:  # noqa: BLE001 (daemon restart, socket error, ...)
                    if self._stop.is_set():
                        break
                    log.warning(
                        "docker event stream failed (%s: %s); retrying in %.1f s",
                        type(exc).__name__,
                        exc,
                        backoff,
                    )
                    if client is not None:
                        _close_quietly(client)
                        client = None
                finally:
                    self.connected.clear()
                    stream, self._stream = self._stream, None
                    if stream is not None:
                        _close_quietly(stream)
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.backoff_max_s)
        finally:
            if client is not None:
                _close_quietly(client)
            push(_Stop())

    async def events(self) -> AsyncIterator[RuntimeEvent]:
        """Container changes and OpenWhisk invocation boundaries, as they happen.

        The SDK's blocking event generator runs in a daemon thread that pushes into an
        asyncio.Queue of the running loop. Only one consumer at a time. The iterator ends after
        close(); leaving it (break, cancellation) stops the thread.
        """
        if self._closed:
            return
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("DockerRuntime.events() already has a consumer")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run_events, args=(loop, queue), name="docker-events", daemon=True
        )
        self._thread.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Stop):
                    return
                yield item
        finally:
            self._stop_thread()

    def _stop_thread(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()  # shuts the socket down: unblocks the thread's read
            except Exception:  # noqa: BLE001
                pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("docker event thread did not stop within %.1f s", timeout_s)

    def close(self) -> None:
        """Stop the event thread (the events() iterator then ends) and close the client."""
        self._closed = True
        self._stop_thread()
        _close_quietly(self._client)


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001
        pass


def _host_mem_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


__all__ = [
    "FUNCTION_LABEL",
    "DockerRuntime",
    "WskName",
    "cgroup_exists",
    "cgroup_path",
    "cgroup_rel_path",
    "function_of",
    "parse_container_name",
    "parse_proc_cgroup",
    "user_size",
]
