"""sidecar.runtimes.docker: pure helpers, the event thread against a fake Engine API, and
discovery and events against a real dockerd (``docker`` marker; skipped with the reason when no
engine can be had, see docker_env.py)."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from docker_env import DockerEngine, busybox_image, client_for, docker_engine  # noqa: F401
from test_api import _client, _setup

from sidecar.cgroups import shares_to_weight
from sidecar.daemon import reload
from sidecar.node import NODE
from sidecar.runtimes.base import ContainerRef, RuntimeEvent, UserSize
from sidecar.runtimes.docker import (
    FUNCTION_LABEL,
    DockerRuntime,
    WskName,
    cgroup_exists,
    cgroup_path,
    cgroup_rel_path,
    function_of,
    parse_container_name,
    parse_proc_cgroup,
    user_size,
)
from sidecar.units import MB as MiB

CID = "f" * 64


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wsk0_12_guest_hello", WskName("0", 12, "guest", "hello")),
        ("/wsk0_12_guest_hello", WskName("0", 12, "guest", "hello")),  # API names have a "/"
        ("wsk3_7_guest_img-resize", WskName("3", 7, "guest", "img-resize")),
        ("wsk0_1_guest_hello_world", WskName("0", 1, "guest", "hello_world")),
        ("wsk0_1_guest_my_pkg_do-it", WskName("0", 1, "guest", "my_pkg_do-it")),
        ("wsk0_1_a-b_c", WskName("0", 1, "a-b", "c")),
        ("wskinvoker07_44_ns_act", WskName("invoker07", 44, "ns", "act")),
        ("wsk12_3_prewarm_nodejs14", WskName("12", 3, "prewarm", "nodejs14")),
        ("wsk_1_guest_hello", WskName("", 1, "guest", "hello")),
    ],
)
def test_parse_openwhisk_names(name: str, expected: WskName) -> None:
    assert parse_container_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "nginx",
        "wsk0",
        "wsk0_12",
        "wsk0_12_guest",  # no action
        "wsk0_12_guest_",  # empty action
        "wsk0_12__hello",  # empty namespace
        "wsk0_x_guest_hello",  # sequence not a number
        "wsk-0_1_guest_hello",
        "xwsk0_1_guest_hello",
        "my-wsk0_1_guest_hello",
        "WSK0_1_guest_hello",
    ],
)
def test_non_openwhisk_names(name: str) -> None:
    assert parse_container_name(name) is None


def test_known_namespaces_resolve_underscores() -> None:
    # Without knowing the namespaces the first token is taken; with them the longest match wins.
    assert parse_container_name("wsk0_5_whisk_system_invokerHealthTestAction0").function == (
        "whisk/system_invokerHealthTestAction0"
    )
    parsed = parse_container_name(
        "wsk0_5_whisk_system_invokerHealthTestAction0", namespaces=["whisk", "whisk_system"]
    )
    assert parsed == WskName("0", 5, "whisk_system", "invokerHealthTestAction0")
    # A known namespace that would leave no action is not used.
    assert parse_container_name("wsk0_5_a_b", namespaces=["a_b"]) == WskName("0", 5, "a", "b")
    # Unknown namespaces fall back to the first token.
    assert parse_container_name("wsk0_5_guest_x", namespaces=["other"]).namespace == "guest"


def test_prewarm_flag() -> None:
    assert parse_container_name("wsk0_3_prewarm_nodejs14").prewarm
    assert not parse_container_name("wsk0_3_guest_nodejs14").prewarm


def test_function_label_overrides_and_opts_in() -> None:
    assert function_of("wsk0_1_guest_hello", {}) == "guest/hello"
    assert function_of("wsk0_1_guest_hello", None) == "guest/hello"
    assert function_of("wsk0_1_guest_hello", {FUNCTION_LABEL: "team/resize"}) == "team/resize"
    assert function_of("/sidecar-demo", {FUNCTION_LABEL: "team/resize"}) == "team/resize"
    assert function_of("wsk0_1_guest_hello", {FUNCTION_LABEL: "  "}) == "guest/hello"
    assert function_of("postgres", {"other": "x"}) is None


# --------------------------------------------------------------------------- user size


def _size(hc: dict[str, Any], **kw: Any) -> UserSize:
    args = {"cores_per_share": 2 / 1024, "host_cpus": 2.0, "host_mem_bytes": 8 << 30, **kw}
    return user_size(hc, **args)


def test_user_size_from_openwhisk_shares() -> None:
    # OpenWhisk: 256 MiB of a 2 GiB pool -> 128 shares -> 1/8 of the host's 2 cores.
    size = _size({"Memory": 256 * MiB, "CpuShares": 128, "NanoCpus": 0, "CpuQuota": 0})
    assert size == UserSize(cpu_cores=0.25, mem_bytes=256 * MiB, cpu_weight=shares_to_weight(128))
    assert size.cpu_weight == 12


def test_user_size_cpu_precedence() -> None:
    both = {"Memory": MiB, "NanoCpus": 1_500_000_000, "CpuQuota": 50_000, "CpuShares": 512}
    assert _size(both).cpu_cores == 1.5  # --cpus first
    assert _size({**both, "NanoCpus": 0}).cpu_cores == 0.5  # then quota / default period
    assert _size({**both, "NanoCpus": 0, "CpuPeriod": 200_000}).cpu_cores == 0.25
    assert _size({**both, "NanoCpus": 0, "CpuQuota": -1}).cpu_cores == 1.0  # then shares
    assert _size({**both, "NanoCpus": 0, "CpuQuota": 0}, cores_per_share=0.001).cpu_cores == 0.512
    assert _size({**both, "NanoCpus": 4_000_000_000}).cpu_cores == 2.0  # capped at the host
    assert _size({**both, "NanoCpus": 0}).cpu_weight == 50


def test_user_size_unlimited_defaults() -> None:
    # docker run with nothing set: HostConfig has zeros (or null) everywhere.
    for hc in ({"Memory": 0, "NanoCpus": 0, "CpuQuota": 0, "CpuShares": 0}, {}, {"Memory": None}):
        assert _size(hc) == UserSize(cpu_cores=2.0, mem_bytes=8 << 30, cpu_weight=100)


# --------------------------------------------------------------------------- cgroup paths


def test_cgroup_paths_per_driver_and_version() -> None:
    assert cgroup_path(CID, "cgroupfs", 1) == f"docker/{CID}"
    assert cgroup_path(CID, "systemd", 1) == f"system.slice/docker-{CID}.scope"
    assert cgroup_path(CID, "cgroupfs", 2, root="/nonexistent") == f"/nonexistent/docker/{CID}"
    assert cgroup_path(CID, "systemd", 2, root="/nonexistent") == (
        f"/nonexistent/system.slice/docker-{CID}.scope"
    )


def test_cgroup_parent() -> None:
    assert cgroup_rel_path(CID, "cgroupfs", "/invoker") == f"invoker/{CID}"
    assert cgroup_rel_path(CID, "cgroupfs", "/a/b/") == f"a/b/{CID}"
    assert cgroup_rel_path(CID, "systemd", "ow-invoker.slice") == (
        f"ow.slice/ow-invoker.slice/docker-{CID}.scope"
    )
    assert cgroup_rel_path(CID, "systemd", "machine.slice") == f"machine.slice/docker-{CID}.scope"
    with pytest.raises(ValueError, match="systemd slice"):
        cgroup_rel_path(CID, "systemd", "not-a-slice")
    with pytest.raises(ValueError, match="driver"):
        cgroup_rel_path(CID, "lxc")


def test_cgroup_v2_path_in_hybrid_layout(tmp_path: Any) -> None:
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("cpu io memory pids\n")
    assert cgroup_path(CID, "systemd", 2, root=str(tmp_path)) == str(
        tmp_path / "unified" / "system.slice" / f"docker-{CID}.scope"
    )


def test_cgroup_exists(tmp_path: Any) -> None:
    for c in ("cpu", "memory"):
        (tmp_path / c / "docker" / CID).mkdir(parents=True)
    assert cgroup_exists(f"docker/{CID}", 1, str(tmp_path))
    assert not cgroup_exists("docker/other", 1, str(tmp_path))
    (tmp_path / "memory" / "docker" / "half").mkdir()
    assert not cgroup_exists("docker/half", 1, str(tmp_path))  # needs cpu and memory
    assert cgroup_exists(str(tmp_path / "cpu"), 2, str(tmp_path))


def test_parse_proc_cgroup() -> None:
    v1 = (
        "12:pids:/docker/abc\n"
        "5:cpu,cpuacct:/docker/abc\n"
        "4:memory:/docker/abc\n"
        "1:name=systemd:/docker/abc\n"
        "0::/\n"
    )
    assert parse_proc_cgroup(v1, 1) == "docker/abc"
    v2 = "0::/system.slice/docker-abc.scope\n"
    assert parse_proc_cgroup(v2, 2, root="/nonexistent") == (
        "/nonexistent/system.slice/docker-abc.scope"
    )
    assert parse_proc_cgroup("garbage\n", 1) is None
    assert parse_proc_cgroup(v1.replace("4:memory:/docker/abc\n", ""), 1) is None


# --------------------------------------------------------------------------- fake Engine API


class FakeStream:
    """A CancellableStream: blocks on a queue; None ends the stream (a broken connection)."""

    def __init__(self) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        self.closed = threading.Event()

    def __iter__(self) -> FakeStream:
        return self

    def __next__(self) -> dict[str, Any]:
        while not self.closed.is_set():
            try:
                item = self.items.get(timeout=0.02)
            except queue.Empty:
                continue
            if item is None:
                raise StopIteration
            return item
        raise StopIteration

    def close(self) -> None:
        self.closed.set()


class FakeEngine:
    """Containers and streams shared by every FakeClient (one per thread, like the real SDK)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.containers: dict[str, dict[str, Any]] = {}
        self.streams: list[FakeStream] = []
        self.events_calls: list[dict[str, Any]] = []
        self.fail_connects = 0
        self.lock = threading.Lock()
        self.new_stream = threading.Event()
        self.list_delay_s = 0.0  # how long a listing takes (a busy engine: seconds)
        self.listings = 0

    def add(self, name: str, cid: str, labels: dict[str, str] | None = None, **hc: Any) -> str:
        for c in ("cpu", "memory"):
            os.makedirs(os.path.join(self.root, c, "docker", cid), exist_ok=True)
        self.containers[cid] = {
            "Id": cid,
            "Name": "/" + name,
            "Config": {"Labels": labels or {}},
            "State": {"Running": True, "Paused": False, "Pid": 0},
            "HostConfig": {"Memory": 128 * MiB, "CpuShares": 256, **hc},
        }
        return cid

    def event(self, action: str, cid: str, stream: int = -1, t_ns: int | None = None) -> None:
        c = self.containers.get(cid)
        attrs = {"name": c["Name"].lstrip("/"), **c["Config"]["Labels"]} if c else {"name": "x"}
        self.streams[stream].items.put(
            {
                "Type": "container",
                "Action": action,
                "Actor": {"ID": cid, "Attributes": attrs},
                "timeNano": t_ns if t_ns is not None else time.time_ns(),
            }
        )


class FakeAPI:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    def containers(self, all: bool = False) -> list[dict[str, Any]]:  # noqa: A002
        time.sleep(self.engine.list_delay_s)
        self.engine.listings += 1
        return [
            {
                "Id": c["Id"],
                "Names": [c["Name"]],
                "Labels": c["Config"]["Labels"],
                "State": "paused" if c["State"].get("Paused") else "running",
            }
            for c in self.engine.containers.values()
        ]

    def inspect_container(self, cid: str) -> dict[str, Any]:
        import docker.errors

        if cid not in self.engine.containers:
            raise docker.errors.NotFound(f"no such container {cid}")
        return self.engine.containers[cid]

    def events(self, **kw: Any) -> FakeStream:
        with self.engine.lock:
            self.engine.events_calls.append(kw)
            if self.engine.fail_connects > 0:
                self.engine.fail_connects -= 1
                raise ConnectionError("engine down")
            stream = FakeStream()
            self.engine.streams.append(stream)
        self.engine.new_stream.set()
        return stream


class FakeClient:
    def __init__(self, engine: FakeEngine) -> None:
        self.api = FakeAPI(engine)

    def info(self) -> dict[str, Any]:
        return {"CgroupDriver": "cgroupfs", "CgroupVersion": "1", "NCPU": 2, "MemTotal": 8 << 30}

    def close(self) -> None:
        pass


@pytest.fixture
def fake(tmp_path: Any) -> Iterator[tuple[FakeEngine, DockerRuntime]]:
    engine = FakeEngine(str(tmp_path))
    rt = DockerRuntime(
        client_factory=lambda: FakeClient(engine),
        cgroup_root=str(tmp_path),
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    yield engine, rt
    rt.close()


def test_discover_with_fake_engine(fake: tuple[FakeEngine, DockerRuntime]) -> None:
    engine, rt = fake
    a = engine.add("wsk0_1_guest_hello", "a" * 64)
    engine.add("wsk0_2_guest_img-resize", "b" * 64, labels={FUNCTION_LABEL: "team/resize"})
    engine.add("postgres", "c" * 64)
    engine.containers["d" * 64] = {**engine.containers[a], "Id": "d" * 64}  # no cgroup dir
    engine.containers["d" * 64]["Name"] = "/wsk0_9_guest_gone"
    engine.add("wsk0_4_guest_paused", "e" * 64)
    engine.containers["e" * 64]["State"] = {"Running": True, "Paused": True}
    refs = {r.id: r for r in rt.discover()}
    assert set(refs) == {a, "b" * 64, "e" * 64}
    assert refs[a] == ContainerRef(
        id=a,
        function="guest/hello",
        runtime="docker",
        cgroup_path=f"docker/{a}",
        cgroup_version=1,
        user=UserSize(cpu_cores=0.5, mem_bytes=128 * MiB, cpu_weight=25),
        labels={},
    )
    assert refs["b" * 64].function == "team/resize"
    assert rt.is_paused(a) is False and rt.is_paused("e" * 64) is True


def test_a_slow_listing_stalls_neither_the_event_loop_nor_the_sampling(
    fake: tuple[FakeEngine, DockerRuntime], tmp_path: Any
) -> None:
    """The node's periodic relist asks the Engine API for its containers, which takes a second
    on a busy engine: the call runs in a worker thread, so meanwhile the event loop keeps
    serving (the sampling loop's ticks, the hook API) and the listing is settled once back."""
    engine, rt = fake
    a = engine.add("wsk0_1_guest_hello", "a" * 64)
    cfg, cfg_path, _ = _setup(tmp_path)
    engine.list_delay_s = 1.0

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        node = client.server.app[NODE]
        try:
            node.runtimes.insert(0, rt)
            ticks, listings = node.sampler.ticks, engine.listings
            start = time.monotonic()
            node.last_discover_s = start - cfg.sampler.discover_every_s  # the next tick relists
            gaps = []
            while time.monotonic() - start < 1.5:
                before = time.monotonic()
                await asyncio.sleep(0.05)
                gaps.append(time.monotonic() - before)
            assert engine.listings == listings + 1 and node.last_discover_s > start
            assert max(gaps) < 0.5, max(gaps)
            assert node.sampler.ticks - ticks >= 15  # 30 ticks of 50 ms in 1.5 s
            assert rt.is_paused(a) is False  # listed, its state kept
        finally:
            await client.close()

    asyncio.run(main())


def test_a_sighup_reload_lists_the_containers_off_the_event_loop(
    fake: tuple[FakeEngine, DockerRuntime], tmp_path: Any
) -> None:
    """A reload re-lists every runtime in full (``discover``), which takes as long as the Engine
    API does: the listing runs in a worker thread, so meanwhile the event loop keeps serving
    (the ticks, the hook API) and the listing is settled once back."""
    engine, rt = fake
    a = engine.add("wsk0_1_guest_hello", "a" * 64)
    cfg, cfg_path, _ = _setup(tmp_path)
    # no engine at this address: the reload keeps the running runtimes, the fake one among them
    no_engine = f"unix://{tmp_path / 'no-engine.sock'}"
    cfg_path.write_text(
        f"{cfg_path.read_text()}[docker]\nenabled = true\nbase_url = '{no_engine}'\n"
    )
    engine.list_delay_s = 1.0

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        app = client.server.app
        node = app[NODE]
        try:
            node.runtimes.insert(0, rt)
            ticks, listings = node.sampler.ticks, engine.listings
            reloading = asyncio.create_task(reload(app))
            gaps = []
            while not reloading.done():
                before = time.monotonic()
                await asyncio.sleep(0.05)
                gaps.append(time.monotonic() - before)
            assert reloading.result() is True and rt in node.runtimes
            assert engine.listings == listings + 1
            assert max(gaps) < 0.5, max(gaps)
            assert node.sampler.ticks - ticks >= 10  # 20 ticks of 50 ms in the 1 s listing
            assert rt.is_paused(a) is False  # listed, its state kept
        finally:
            await client.close()

    asyncio.run(main())


async def _next(it: Any, timeout: float = 5.0) -> RuntimeEvent:
    return await asyncio.wait_for(it.__anext__(), timeout)


async def _wait_stream(engine: FakeEngine, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(engine.streams) < n:
        assert time.monotonic() < deadline, "no event stream opened"
        await asyncio.sleep(0.005)


def test_events_translation_and_filtering(fake: tuple[FakeEngine, DockerRuntime]) -> None:
    engine, rt = fake
    a = engine.add("wsk0_1_guest_hello", "a" * 64)
    other = engine.add("postgres", "c" * 64)
    rt.discover()

    async def run() -> list[tuple[str, str, str | None]]:
        it = rt.events()
        first = asyncio.ensure_future(it.__anext__())
        await _wait_stream(engine, 1)
        engine.event("pause", other)  # not OpenWhisk: ignored
        engine.event("pause", a)
        got = [await asyncio.wait_for(first, 5)]
        engine.event("unpause", a)
        got.append(await _next(it))
        engine.event("start", a)  # already known from discover(): no duplicate "added"
        b = engine.add("wsk0_2_guest_new", "b" * 64)
        engine.event("start", b)
        got.append(await _next(it))
        engine.event("exec_start: sh -c true", b)  # not a kind we map
        engine.event("die", a)
        got.append(await _next(it))
        engine.event("destroy", a)  # already announced: dropped
        engine.event("unpause", b)
        got.append(await _next(it))
        # A boundary on a container never seen: announced with "added" first.
        c = engine.add("wsk0_3_guest_late", "3" * 64)
        engine.event("pause", c)
        got += [await _next(it), await _next(it)]
        engine.event("destroy", other)  # not OpenWhisk and unknown: ignored
        engine.event("destroy", b)
        got.append(await _next(it))
        await it.aclose()
        return [(e.kind, e.container_id[:1], e.ref.function if e.ref else None) for e in got]

    assert asyncio.run(run()) == [
        ("invocation_end", "a", "guest/hello"),
        ("invocation_start", "a", "guest/hello"),
        ("added", "b", "guest/new"),
        ("removed", "a", "guest/hello"),
        ("invocation_start", "b", "guest/new"),
        ("added", "3", "guest/late"),
        ("invocation_end", "3", "guest/late"),
        ("removed", "b", "guest/new"),
    ]
    assert rt.is_paused("3" * 64) is True
    assert engine.events_calls[0]["filters"]["type"] == "container"


def test_events_reconnect_with_backoff_and_resync(fake: tuple[FakeEngine, DockerRuntime]) -> None:
    engine, rt = fake
    a = engine.add("wsk0_1_guest_hello", "a" * 64)
    gone = engine.add("wsk0_2_guest_gone", "2" * 64)
    rt.discover()

    async def run() -> list[tuple[str, str]]:
        it = rt.events()
        first = asyncio.ensure_future(it.__anext__())
        await _wait_stream(engine, 1)
        engine.event("pause", a, t_ns=1_000_000_123)
        got = [await asyncio.wait_for(first, 5)]
        # The connection breaks; while it is down a container goes and another comes, and the
        # engine refuses two connection attempts.
        engine.fail_connects = 2
        del engine.containers[gone]
        new = engine.add("wsk0_3_guest_new", "3" * 64)
        engine.streams[0].items.put(None)
        got += [await _next(it), await _next(it)]  # resync: added + removed
        # The new stream replays the last event (since=) and then goes on.
        await _wait_stream(engine, 2)
        engine.event("pause", a, stream=1, t_ns=1_000_000_123)  # a replay: dropped
        engine.event("unpause", new, stream=1, t_ns=2_000_000_000)
        got.append(await _next(it))
        await it.aclose()
        return [(e.kind, e.container_id[:1]) for e in got]

    got = asyncio.run(run())
    assert got[0] == ("invocation_end", "a")
    assert sorted(got[1:3]) == [("added", "3"), ("removed", "2")]
    assert got[3] == ("invocation_start", "3")
    calls = engine.events_calls
    assert len(calls) == 4  # first, two refused, reconnected
    assert calls[0]["since"] is None
    assert all(c["since"] == "1.000000123" for c in calls[1:])


def test_a_pause_lost_while_the_stream_was_down_ends_the_invocation_at_resync(
    fake: tuple[FakeEngine, DockerRuntime],
) -> None:
    """OpenWhisk pauses a container when its activation ends. A pause while the event stream was
    down, and not replayed, would leave the invocation its unpause started open for good: the
    resync's listing shows the container paused and ends it. A container still running, or one
    already paused before, gets nothing."""
    engine, rt = fake
    a = engine.add("wsk0_1_guest_hello", "a" * 64)
    b = engine.add("wsk0_2_guest_busy", "b" * 64)
    idle = engine.add("wsk0_3_guest_idle", "c" * 64)
    engine.containers[idle]["State"] = {"Running": True, "Paused": True}
    rt.discover()

    async def run() -> list[tuple[str, str]]:
        it = rt.events()
        first = asyncio.ensure_future(it.__anext__())
        await _wait_stream(engine, 1)
        engine.event("unpause", a, t_ns=1_000_000_000)
        engine.event("unpause", b, t_ns=2_000_000_000)
        got = [await asyncio.wait_for(first, 5), await _next(it)]
        # the stream breaks; meanwhile a's activation ends (paused), b's goes on
        engine.containers[a]["State"] = {"Running": True, "Paused": True}
        engine.streams[0].items.put(None)
        got.append(await _next(it))
        with pytest.raises(asyncio.TimeoutError):  # nothing for b or the idle container
            await asyncio.wait_for(it.__anext__(), 0.3)
        await it.aclose()
        return [(e.kind, e.container_id[:1]) for e in got]

    assert asyncio.run(run()) == [
        ("invocation_start", "a"),
        ("invocation_start", "b"),
        ("invocation_end", "a"),
    ]
    assert rt.is_paused(a) is True and rt.is_paused(b) is False


def test_close_ends_the_iterator_and_the_thread(fake: tuple[FakeEngine, DockerRuntime]) -> None:
    engine, rt = fake

    async def run() -> None:
        it = rt.events()
        nxt = asyncio.ensure_future(it.__anext__())
        await _wait_stream(engine, 1)
        t0 = time.monotonic()
        await asyncio.to_thread(rt.close)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(nxt, 2)
        assert time.monotonic() - t0 < 1.0

    asyncio.run(run())
    assert rt._thread is not None and not rt._thread.is_alive()
    assert engine.streams[0].closed.is_set()

    async def after_close() -> list[RuntimeEvent]:
        return [e async for e in rt.events()]

    assert asyncio.run(after_close()) == []


def test_cancelling_the_consumer_stops_the_thread(fake: tuple[FakeEngine, DockerRuntime]) -> None:
    engine, rt = fake

    async def consume() -> None:
        async for _ in rt.events():
            pass

    async def run() -> None:
        task = asyncio.create_task(consume())
        await _wait_stream(engine, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert rt._thread is not None and not rt._thread.is_alive()


# --------------------------------------------------------------------------- real dockerd


@pytest.fixture
def docker_client(docker_engine: DockerEngine) -> Iterator[Any]:  # noqa: F811
    client = client_for(docker_engine)
    yield client
    client.close()


class Containers:
    """Creates containers for one test and force-removes them (and leftovers by name) after."""

    def __init__(self, client: Any, image: str) -> None:
        self.client, self.image = client, image
        self.created: list[str] = []

    def run(self, name: str, **kw: Any) -> Any:
        import docker.errors

        try:  # a leftover of an interrupted run
            self.client.containers.get(name).remove(force=True)
        except docker.errors.NotFound:
            pass
        c = self.client.containers.run(
            self.image, ["sleep", "600"], name=name, detach=True, network_mode="none", **kw
        )
        self.created.append(c.id)
        return c

    def cleanup(self) -> None:
        import docker.errors

        for cid in self.created:
            try:
                self.client.api.remove_container(cid, force=True)
            except docker.errors.NotFound:
                pass


@pytest.fixture
def containers(docker_client: Any, busybox_image: str) -> Iterator[Containers]:  # noqa: F811
    made = Containers(docker_client, busybox_image)
    yield made
    made.cleanup()


@pytest.fixture
def docker_runtime(docker_engine: DockerEngine) -> Iterator[DockerRuntime]:  # noqa: F811
    rt = DockerRuntime(docker_engine.base_url)
    yield rt
    rt.close()


def _v1_file(ref: ContainerRef, controller: str, name: str) -> str:
    with open(os.path.join("/sys/fs/cgroup", controller, ref.cgroup_path, name)) as fh:
        return fh.read().strip()


@pytest.mark.docker
def test_real_discover(containers: Containers, docker_runtime: DockerRuntime) -> None:
    hello = containers.run("wsk0_1_guest_hello", mem_limit=128 * MiB, cpu_shares=256)
    resize = containers.run("wsk0_2_guest_img-resize", mem_limit=256 * MiB, cpu_shares=512)
    labelled = containers.run(
        "wsk0_3_guest_x",
        mem_limit=64 * MiB,
        nano_cpus=500_000_000,
        labels={FUNCTION_LABEL: "team/custom"},
    )
    plain = containers.run("web-server", mem_limit=64 * MiB, cpu_shares=256)
    refs = {r.id: r for r in docker_runtime.discover()}
    assert plain.id not in refs
    assert {hello.id, resize.id, labelled.id} <= set(refs)
    cpus = docker_runtime.host_cpus
    for c, function, mem, cores, weight in (
        (hello, "guest/hello", 128 * MiB, 256 * cpus / 1024, 25),
        (resize, "guest/img-resize", 256 * MiB, 512 * cpus / 1024, 50),
        (labelled, "team/custom", 64 * MiB, 0.5, 100),
    ):
        ref = refs[c.id]
        assert ref.function == function
        assert ref.runtime == "docker"
        assert ref.user.cpu_cores == pytest.approx(cores)
        assert (ref.user.mem_bytes, ref.user.cpu_weight) == (mem, weight)
        assert cgroup_exists(ref.cgroup_path, ref.cgroup_version)
        if ref.cgroup_version == 1:
            assert ref.cgroup_path.endswith(c.id)
            assert int(_v1_file(ref, "memory", "memory.limit_in_bytes")) == mem
            pids = _v1_file(ref, "cpu", "cgroup.procs").split()
            assert pids, "the container's process is in the discovered cgroup"
        else:
            with open(os.path.join(ref.cgroup_path, "memory.max")) as fh:
                assert int(fh.read()) == mem
    assert refs[labelled.id].labels[FUNCTION_LABEL] == "team/custom"


@pytest.mark.docker
def test_real_events(containers: Containers, docker_runtime: DockerRuntime) -> None:
    hello = containers.run("wsk0_1_guest_hello", mem_limit=128 * MiB, cpu_shares=256)
    plain = containers.run("web-server", mem_limit=64 * MiB)
    docker_runtime.discover()
    tag = uuid.uuid4().hex[:6]

    async def expect(it: Any, kind: str, cid: str) -> RuntimeEvent:
        ev = await _next(it, timeout=10)
        assert (ev.kind, ev.container_id) == (kind, cid), ev
        return ev

    async def run() -> None:
        it = docker_runtime.events()
        first = asyncio.ensure_future(it.__anext__())
        # Events before the stream connects are not replayed: wait for it.
        assert await asyncio.to_thread(docker_runtime.connected.wait, 10)
        await asyncio.to_thread(plain.pause)  # ignored: not an OpenWhisk container
        await asyncio.to_thread(hello.pause)
        ev = await asyncio.wait_for(first, 10)
        assert (ev.kind, ev.container_id) == ("invocation_end", hello.id), ev
        assert ev.ref is not None and ev.ref.function == "guest/hello"
        await asyncio.to_thread(plain.unpause)
        await asyncio.to_thread(hello.unpause)
        await expect(it, "invocation_start", hello.id)
        new = await asyncio.to_thread(
            containers.run, f"wsk0_7_guest_img-resize-{tag}", mem_limit=96 * MiB, cpu_shares=384
        )
        ev = await expect(it, "added", new.id)
        assert ev.ref is not None and ev.ref.function == f"guest/img-resize-{tag}"
        assert ev.ref.user.mem_bytes == 96 * MiB
        assert cgroup_exists(ev.ref.cgroup_path, ev.ref.cgroup_version)
        await asyncio.to_thread(new.kill)
        await expect(it, "removed", new.id)
        await asyncio.to_thread(new.remove)  # destroy: already announced
        await asyncio.to_thread(hello.remove, force=True)  # kill + die + destroy
        await expect(it, "removed", hello.id)
        await asyncio.to_thread(plain.remove, force=True)
        # Nothing else (no duplicate removed, nothing for the plain container).
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(it.__anext__(), 0.5)
        t0 = time.monotonic()
        await asyncio.to_thread(docker_runtime.close)
        assert time.monotonic() - t0 < 2.0
        assert [e async for e in it] == []

    asyncio.run(run())
    assert docker_runtime._thread is not None and not docker_runtime._thread.is_alive()
