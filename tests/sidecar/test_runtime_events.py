"""The daemon's runtime wiring without Docker: runtimes in order (first claim on a cgroup wins),
pushed events (added/removed/boundaries) and who owns an invocation, reload replacing a runtime's
consumer. Fake runtimes over the v2 fixture trees of test_api."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from sidecar_helpers import MB
from test_api import _client, _setup

from sidecar import cgroups, config
from sidecar.daemon import EVENT_TASKS, _start_consumers, make_runtimes, reload
from sidecar.node import NODE
from sidecar.runtimes.base import ContainerRef, RuntimeBase, RuntimeEvent, UserSize


class FakeRuntime(RuntimeBase):
    """Lists given refs and pushes events from a queue."""

    def __init__(self, name: str, refs: list[ContainerRef]) -> None:
        super().__init__()
        self.name = name
        self.refs = refs
        self.queue: asyncio.Queue[RuntimeEvent | None] = asyncio.Queue()
        self.closed = False

    def discover(self) -> list[ContainerRef]:
        return list(self.refs)

    async def events(self):  # noqa: ANN201
        while (ev := await self.queue.get()) is not None:
            yield ev

    def close(self) -> None:
        self.closed = True
        self.queue.put_nowait(None)


def _ref(cid: str, path: Path, runtime: str = "fake") -> ContainerRef:
    return ContainerRef(cid, "guest/hello", runtime, str(path), 2, UserSize(2.0, 512 * MB, 100))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


def test_make_runtimes_docker_first_and_unreachable_engine_is_a_config_error() -> None:
    cfg = config.from_dict(
        {"docker": {"enabled": True, "base_url": "unix:///nonexistent/docker.sock"}}
    )
    try:
        make_runtimes(cfg)
    except config.ConfigError as exc:
        assert "docker.enabled" in str(exc) and "/nonexistent/docker.sock" in str(exc)
    else:
        raise AssertionError("an unreachable engine must be refused")
    assert [rt.name for rt in make_runtimes(config.from_dict({}))] == ["cgroupfs"]


def test_docker_config_section() -> None:
    cfg = config.from_dict(
        {"docker": {"enabled": True, "cores_per_share": 0.002, "namespaces": ["whisk_system"]}}
    )
    assert cfg.docker.namespaces == ["whisk_system"] and cfg.docker.cores_per_share == 0.002
    for bad, needle in (
        ({"cores_per_share": -1.0}, "docker.cores_per_share"),
        ({"base_url": "/var/run/docker.sock"}, "docker.base_url"),
        ({"namespaces": "guest"}, "docker.namespaces"),
    ):
        try:
            config.from_dict({"docker": bad})
        except config.ConfigError as exc:
            assert needle in str(exc)
        else:
            raise AssertionError(bad)


def test_first_runtime_claims_a_cgroup_and_events_own_their_invocations(tmp_path: Path) -> None:
    cfg, cfg_path, dirs = _setup(tmp_path)
    resize, thumb = dirs["resize@1"], dirs["thumb@1"]

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        app = client.server.app
        node = app[NODE]
        try:
            # a more specific runtime listing thumb's cgroup under its own id, registered first
            fake = FakeRuntime("fake", [_ref("ctr-thumb", thumb)])
            node.runtimes.insert(0, fake)
            node.sync_containers()
            ids = set(node.engine.containers)
            assert "ctr-thumb" in ids and "faasrm/thumb@1" not in ids  # one owner per cgroup
            assert "faasrm/resize@1" in ids
            _start_consumers(app, [fake])

            # added for a cgroup another runtime already manages: ignored
            fake.queue.put_nowait(RuntimeEvent("added", "dup", _ref("dup", resize)))
            # boundaries: unpause starts, pause ends what it started
            fake.queue.put_nowait(RuntimeEvent("invocation_start", "ctr-thumb"))
            await _settle()
            assert "dup" not in node.engine.containers
            active = node.engine.containers["ctr-thumb"].active
            assert active is not None
            fake.queue.put_nowait(RuntimeEvent("invocation_end", "ctr-thumb"))
            await _settle()
            assert node.engine.containers["ctr-thumb"].active is None

            # an invocation the hook API started is neither doubled nor ended by the runtime
            r = await client.post("/v1/invocations", json={"container": "ctr-thumb"})
            assert r.status == 200, await r.text()
            hooked = (await r.json())["invocation"]
            fake.queue.put_nowait(RuntimeEvent("invocation_start", "ctr-thumb"))
            fake.queue.put_nowait(RuntimeEvent("invocation_end", "ctr-thumb"))
            await _settle()
            assert node.engine.containers["ctr-thumb"].active.id == hooked
            r = await client.post(f"/v1/invocations/{hooked}/end")
            assert r.status == 200

            # a new container, then its removal
            new_dir = dirs["resize@1"].parent / "new@1"
            new_dir.mkdir()
            for f in resize.iterdir():
                (new_dir / f.name).write_bytes(f.read_bytes())
            new = dataclasses.replace(_ref("ctr-new", new_dir), function="guest/new")
            fake.queue.put_nowait(RuntimeEvent("added", "ctr-new", new))
            await _settle()
            assert node.engine.containers["ctr-new"].ref.function == "guest/new"
            fake.queue.put_nowait(RuntimeEvent("removed", "ctr-new"))
            await _settle()
            assert "ctr-new" not in node.engine.containers
            assert all(not t.done() for t in app[EVENT_TASKS])

            # reload builds new runtimes: the fake is closed, its consumer ends, the new ones
            # get consumers of their own
            assert await reload(app) is True
            await _settle()
            assert fake.closed and fake not in node.runtimes
            live = [t for t in app[EVENT_TASKS] if not t.done()]
            assert [t.get_name() for t in live] == ["faasrm-events-cgroupfs"]
        finally:
            await client.close()

    asyncio.run(main())


class Listed(RuntimeBase):
    """Only what a runtime must give: a name and a full listing; the rest is RuntimeBase's."""

    name = "listed"

    def __init__(self, refs: list[ContainerRef]) -> None:
        super().__init__()
        self.refs = refs

    def discover(self) -> list[ContainerRef]:
        return list(self.refs)


def test_runtime_defaults_and_the_periodic_listing_asks_relist(tmp_path: Path) -> None:
    cfg, cfg_path, dirs = _setup(tmp_path)
    thumb = dirs["thumb@1"]
    plain = Listed([_ref("ctr-thumb", thumb)])
    assert plain.relist() == plain.discover() and plain.is_paused("ctr-thumb") is None
    cg = plain.open(plain.refs[0])
    try:
        assert isinstance(cg, cgroups.CgroupV2) and cg.paths == (str(thumb),)
    finally:
        cg.close()

    async def events_end_on_close() -> list[RuntimeEvent]:
        asyncio.get_running_loop().call_later(0.01, plain.close)
        return [ev async for ev in plain.events()]

    assert asyncio.run(events_end_on_close()) == []

    class CheapListing(Listed):
        def relist(self) -> list[ContainerRef]:
            return []  # what a missed "removed" event looks like to the safety net

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        node = client.server.app[NODE]
        try:
            node.runtimes.insert(0, CheapListing([_ref("ctr-thumb", thumb)]))
            node.sync_containers()
            assert "ctr-thumb" in node.engine.containers
            node.sync_containers(full=False)
            assert "ctr-thumb" not in node.engine.containers
            assert "faasrm/thumb@1" in node.engine.containers  # the catch-all claims it now
        finally:
            await client.close()

    asyncio.run(main())
