"""The model poller: long-poll the registry, validate, hot-swap, refuse bad models, roll back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sidecar_helpers import GRID, onnx_policy, write_policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from trainer_helpers import TOKEN, ServerThread  # noqa: E402

from sidecar.config import ModelPollerConfig  # noqa: E402
from sidecar.core.grid import ResourceGrid  # noqa: E402
from sidecar.model_poller import ModelPoller  # noqa: E402
from sidecar.models import ModelManager  # noqa: E402
from training.service import TrainerError, publish  # noqa: E402

pytest.importorskip("onnxruntime")


class StubNode:
    def __init__(self, grid: ResourceGrid = GRID) -> None:
        self.models = ModelManager(grid, "/nonexistent/default.onnx")
        self.record_observers: list = []


def poller(tmp: Path, url: str, node=None, **kw) -> ModelPoller:
    cfg = ModelPollerConfig(
        enabled=True,
        url=url,
        dir=str(tmp / "models"),
        wait_s=kw.pop("wait_s", 0.2),
        min_invocations=5,
        watch_invocations=50,
        max_slowdown_rate=0.3,
        **kw,
    )
    return ModelPoller(node or StubNode(), cfg, url, token=TOKEN)


async def poll(p: ModelPoller) -> str:
    async with aiohttp.ClientSession() as s:
        return await p.poll_once(s)


@contextlib.asynccontextmanager
async def fake_trainer(
    latest: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A real HTTP server on 127.0.0.1 whose ``/v1/models/latest`` is ``latest`` (a trainer or
    proxy that misbehaves in a chosen way); yields its URL."""
    app = web.Application()
    app.router.add_get("/v1/models/latest", latest)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def model_response(data: bytes, version: int, sha: str | None = None) -> web.Response:
    """A ``/v1/models/latest`` answer as the trainer gives it (``sha``: the X-Model-Sha256 it
    claims, by default the body's)."""
    sha = sha or hashlib.sha256(data).hexdigest()
    return web.Response(
        body=data,
        headers={
            "ETag": f'"v{version}-{sha[:16]}"',
            "X-Model-Version": str(version),
            "X-Model-Sha256": sha,
        },
    )


async def run_for(p: ModelPoller, seconds: float) -> None:
    """``p.run()`` for ``seconds``, then cancelled."""
    task = asyncio.create_task(p.run())
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def rec(model: str, slow: bool) -> dict:
    dur = 2.0 if slow else 1.0
    return {"model": model, "outcome": "success", "baseline_s": 1.0, "duration_s": dur}


def test_adopt_refuse_rollback_restore(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "data") as srv:
        node = StubNode()
        p = poller(tmp_path, srv.url, node)
        assert asyncio.run(poll(p)) == "none"
        publish(srv.url, TOKEN, onnx_policy("harvest"))
        assert asyncio.run(poll(p)) == "new"
        v1_id = node.models.current.id
        assert node.models.current.source == "onnx" and p.active_version == 1
        assert asyncio.run(poll(p)) == "same"  # 304 after the wait
        # a NaN-producing model and a corrupt file never reach the registry
        for data in (onnx_policy("nan"), onnx_policy("harvest")[:300]):
            with pytest.raises(TrainerError) as e:
                publish(srv.url, TOKEN, data)
            assert e.value.status == 422 and "no node could run" in e.value.reason
        assert asyncio.run(poll(p)) == "same"
        # a node refuses what it cannot run itself (here: on another grid), keeps its model
        # and does not fetch that version again
        other = StubNode(ResourceGrid(0.5, 4, 128.0, 4))
        p_other = poller(tmp_path / "other", srv.url, other)
        assert asyncio.run(poll(p_other)) == "new"
        assert other.models.current.source == "fallback" and p_other.active_version is None
        assert p_other.history[-1]["result"] == "rejected"
        assert "trained for grid" in p_other.history[-1]["reason"]
        assert asyncio.run(poll(p_other)) == "same"
        # v2 is adopted, then rolled back when its live slowdown rate exceeds the bound
        publish(srv.url, TOKEN, onnx_policy("user"))
        asyncio.run(poll(p))
        v2_id = node.models.current.id
        assert v2_id != v1_id and p.active_version == 2
        for slow in (True, False, True, True, False):
            for obs in node.record_observers:
                obs(rec(v2_id, slow))
        assert node.models.current.id == v1_id and p.active_version == 1
        assert [h["result"] for h in p.history][-2:] == ["loaded", "rolled_back"]
        # after a restart the active registry version is reloaded at once
        node2 = StubNode()
        p2 = poller(tmp_path, srv.url, node2)
        p2.restore_active()
        assert node2.models.current.id == v1_id and p2.active_version == 1
        assert p2.status()["active_version"] == 1
        # a SIGHUP reload puts the local model back; the daemon then restores the registry's
        assert node2.models.load(write_policy(tmp_path / "local.onnx", "nan_when_busy"))
        assert node2.models.current.id != v1_id
        p2.restore_active("kept across SIGHUP")
        assert node2.models.current.id == v1_id and p2.history[-1]["reason"] == "kept across SIGHUP"


def test_long_poll_learns_of_a_promotion_within_a_second(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "data") as srv:
        publish(srv.url, TOKEN, onnx_policy("harvest"))
        node = StubNode()
        p = poller(tmp_path, srv.url, node, wait_s=10)
        asyncio.run(poll(p))

        async def race() -> float:
            task = asyncio.create_task(poll(p))
            await asyncio.sleep(0.5)
            t0 = time.monotonic()
            await asyncio.to_thread(publish, srv.url, TOKEN, onnx_policy("user"))
            assert await task == "new"
            return time.monotonic() - t0

        assert asyncio.run(race()) < 1.0
        assert p.active_version == 2


@pytest.mark.parametrize("status", [304, 404])
def test_a_trainer_that_answers_at_once_is_polled_at_most_once_per_interval(
    tmp_path: Path, status: int
) -> None:
    """A trainer (or proxy) that answers without waiting must not make the node spin: one poll
    per min(1 s, wait_s) at most."""
    hits: list[float] = []

    async def latest(request: web.Request) -> web.Response:
        hits.append(time.monotonic())
        return web.Response(status=status, headers={"ETag": '"v1-0"'})

    async def main() -> None:
        async with fake_trainer(latest) as url:
            await run_for(poller(tmp_path, url, wait_s=0.5), 2.0)

    asyncio.run(main())
    assert 2 <= len(hits) <= 5, len(hits)


def test_a_model_served_again_under_the_same_etag_is_not_adopted_again(tmp_path: Path) -> None:
    """A server or proxy that ignores If-None-Match answers 200 with the version the node has:
    not loaded again, and the rollback watch of that version goes on counting."""
    data = onnx_policy("harvest")

    async def latest(request: web.Request) -> web.Response:
        return model_response(data, 1)

    async def main() -> ModelPoller:
        async with fake_trainer(latest) as url:
            p = poller(tmp_path, url)
            assert await poll(p) == "new"
            for _ in range(3):
                p.on_record(rec(p.node.models.current.id, slow=False))
            assert await poll(p) == "same"
            return p

    p = asyncio.run(main())
    assert [h["result"] for h in p.history] == ["loaded"]
    assert p.watch is not None and p.watch["n"] == 3


def test_a_download_is_checked_before_it_is_written_and_never_replaces_another_model(
    tmp_path: Path,
) -> None:
    """A body that does not match its X-Model-Sha256 is refused before it touches the disk, and
    another model under the same version number (a trainer whose registry was reset) gets its
    own file: either way the running model and its file stay, so a restart still loads it."""
    good, other = onnx_policy("harvest"), onnx_policy("harvest", grid=ResourceGrid())
    serving = [model_response(good, 1)]

    async def latest(request: web.Request) -> web.Response:
        return serving[0]

    async def main() -> tuple[ModelPoller, list[str]]:
        async with fake_trainer(latest) as url:
            p = poller(tmp_path, url)
            assert await poll(p) == "new"
            files = sorted(f.name for f in p.dir.iterdir())
            serving[0] = model_response(good[:-7] + b"garbage", 2, p.active["sha256"])
            assert await poll(p) == "error" and "sha256" in (p.last_error or "")
            assert p.history[-1]["result"] == "rejected"
            assert sorted(f.name for f in p.dir.iterdir()) == files
            serving[0] = model_response(other, 1)
            assert await poll(p) == "new" and p.history[-1]["result"] == "rejected"
            return p, files

    p, files = asyncio.run(main())
    sha = hashlib.sha256(good).hexdigest()
    assert p.active_version == 1 and p.node.models.current.sha256 == sha
    assert f"v000001-{sha[:16]}.onnx" in files
    assert Path(p.active["path"]).read_bytes() == good
    assert not list(p.dir.glob("*.tmp"))
    node2 = StubNode()
    p2 = poller(tmp_path, "http://127.0.0.1:9", node2)
    p2.restore_active()
    assert node2.models.current.sha256 == sha and p2.active_version == 1


def test_a_restart_during_the_rollback_watch_resumes_it(tmp_path: Path) -> None:
    """The watch of a new model is in active.json: a daemon restarted before the model was
    confirmed still rolls it back when it slows invocations down, and the rollback holds across
    the next restart."""
    with ServerThread(tmp_path / "data") as srv:
        node = StubNode()
        p = poller(tmp_path, srv.url, node)
        publish(srv.url, TOKEN, onnx_policy("harvest"))
        assert asyncio.run(poll(p)) == "new"
        v1_id = node.models.current.id
        publish(srv.url, TOKEN, onnx_policy("user"))
        assert asyncio.run(poll(p)) == "new"
        v2_id = node.models.current.id
        for obs in node.record_observers:
            obs(rec(v2_id, True))
        node2 = StubNode()
        p2 = poller(tmp_path, srv.url, node2)
        p2.restore_active()
        assert node2.models.current.id == v2_id and p2.watch is not None
        assert p2.watch["version"] == 2
        for _ in range(5):
            for obs in node2.record_observers:
                obs(rec(v2_id, True))
        assert node2.models.current.id == v1_id and p2.active_version == 1
        assert p2.history[-1]["result"] == "rolled_back" and p2.watch is None
        node3 = StubNode()
        p3 = poller(tmp_path, srv.url, node3)
        p3.restore_active()
        assert node3.models.current.id == v1_id and p3.watch is None
        assert asyncio.run(poll(p3)) == "same"  # v2 is never taken again
        assert node3.models.current.id == v1_id


@pytest.mark.parametrize("declared", [True, False])
def test_a_download_larger_than_max_model_bytes_is_refused_without_reading_it(
    tmp_path: Path, declared: bool
) -> None:
    """A trainer (or something posing as one) that announces a body beyond max_model_bytes, or
    streams one without end, is refused at once: nothing is written and the running model
    stays (the server never finishes either body, so reading it whole would hang)."""
    data = onnx_policy("harvest")
    sha = hashlib.sha256(data).hexdigest()

    async def latest(request: web.Request) -> web.StreamResponse:
        r = web.StreamResponse(
            headers={"ETag": '"v1-x"', "X-Model-Version": "1", "X-Model-Sha256": sha}
        )
        if declared:
            r.content_length = 1 << 40
        await r.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            while True:  # until the node hangs up
                await r.write(b"\0" * 4096)
                await asyncio.sleep(0.001)
        return r

    async def main() -> ModelPoller:
        async with fake_trainer(latest) as url:
            p = poller(tmp_path, url, max_model_bytes=len(data))
            assert await asyncio.wait_for(poll(p), 5) == "new"
            return p

    p = asyncio.run(main())
    assert p.history[-1]["result"] == "rejected"
    assert f"larger than {len(data)} bytes" in p.history[-1]["reason"]
    assert p.node.models.current.source == "fallback" and p.active_version is None
    assert not list(p.dir.glob("*.onnx*"))


def test_a_refused_model_is_not_fetched_again_after_a_restart(tmp_path: Path) -> None:
    """The ETag of a refused model is in active.json: a restarted node's first poll carries it,
    so it neither downloads that model again nor records another rejection."""
    other = onnx_policy("harvest", grid=ResourceGrid())  # a grid this node cannot run
    resp = model_response(other, 1)
    served: list[str | None] = []

    async def latest(request: web.Request) -> web.Response:
        served.append(request.headers.get("If-None-Match"))
        if request.headers.get("If-None-Match") == resp.headers["ETag"]:
            return web.Response(status=304)
        return model_response(other, 1)

    async def main() -> tuple[ModelPoller, ModelPoller]:
        async with fake_trainer(latest) as url:
            p = poller(tmp_path, url)
            assert await poll(p) == "new" and p.history[-1]["result"] == "rejected"
            p2 = poller(tmp_path, url)
            p2.restore_active()
            assert await poll(p2) == "same"
            return p, p2

    p, p2 = asyncio.run(main())
    assert served == [None, resp.headers["ETag"]]
    assert p2.node.models.current.source == "fallback" and not p2.history


def test_a_clean_restart_resumes_the_rollback_watch_with_its_counts(tmp_path: Path) -> None:
    """Closing the poller (the daemon's shutdown) saves the watch's counts: the next start goes
    on from them, not from the counts saved when the watch began."""
    data = onnx_policy("harvest")

    async def latest(request: web.Request) -> web.Response:
        return model_response(data, 1)

    async def main() -> ModelPoller:
        async with fake_trainer(latest) as url:
            p = poller(tmp_path, url)
            assert await poll(p) == "new"
            return p

    p = asyncio.run(main())
    model = p.node.models.current.id
    for slow in (True, False, False):
        p.on_record(rec(model, slow))
    p.close()
    p2 = poller(tmp_path, "http://127.0.0.1:9")
    p2.restore_active()
    assert p2.watch == {
        "version": 1,
        "model": model,
        "sha256": p.active["sha256"],
        "n": 3,
        "slow": 1,
    }
