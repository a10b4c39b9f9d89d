"""Bad input to the hook API (issue 15, items 2 and 3): sizes the kernel or the host cannot take,
numbers too large for a float, JSON nested 100,000 levels deep, and hypothesis fuzzing of both
POST routes. Every answer is 2xx or 4xx, never 5xx; the server stays up; no state is lost (every
container stays managed, every accepted start can be ended, the limits go back to the user's).

The daemon's app runs in a thread on its unix socket (as ``faasrm sidecar run`` serves it) over
real v1 cgroups: three empty child cgroups of a parent the sidecar manages.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sidecar_helpers import write_policy

from sidecar import cgroups, config
from sidecar.api import add_routes
from sidecar.daemon import build_app, hook_socket
from sidecar.node import NODE
from sidecar.process import Notifier
from sidecar.units import MB
from training.faults import bad_end_bodies, bad_start_bodies, bad_user_sizes
from training.processes import unix_request

pytest.importorskip("onnxruntime")

NAMES = ("a@1", "b@1", "c@1")
USER = (1.0, 256 * MB)


class AppThread:
    """``sidecar.daemon.build_app`` served on its unix socket by an event loop in a thread."""

    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.app: web.Application | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._t = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            self.app = build_app(self.cfg, notifier=Notifier(None))
            runner = web.AppRunner(self.app, access_log=None)
            await runner.setup()
            await web.SockSite(runner, hook_socket(self.cfg.server)).start()
            await self._stop.wait()
            await runner.cleanup()
        except BaseException as exc:  # surfaced by the fixture
            self.error = exc

    def start(self) -> AppThread:
        self._t.start()
        deadline = time.monotonic() + 30
        while request("GET", "/readyz", self.cfg.server.socket, timeout=2)[0] != 200:
            assert self.error is None and time.monotonic() < deadline, self.error
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._t.join(timeout=30)


def request(
    method: str, path: str, sock: str, body: bytes | None = None, timeout: float = 30
) -> tuple[int, Any]:
    """One request on the unix socket; (status, JSON body), (0, reason) if it cannot connect."""
    try:
        return unix_request(sock, method, path, body, timeout)
    except OSError as exc:
        return 0, str(exc)


class Server:
    def __init__(self, thread: AppThread, parent: str) -> None:
        self.thread = thread
        self.sock = thread.cfg.server.socket
        self.containers = [f"{parent}/{n}" for n in NAMES]

    def post(self, path: str, body: bytes) -> tuple[int, Any]:
        return request("POST", path, self.sock, body)

    def check(self, status: int, body: Any) -> None:
        """The answer was no 5xx, no state was lost, and the metrics can still be scraped."""
        assert 200 <= status < 500, (status, body)
        if status >= 400 and isinstance(body, dict):  # the router's own 404s are plain text
            assert isinstance(body.get("error"), str), body
        st_, ready = request("GET", "/readyz", self.sock)
        assert st_ == 200 and ready["containers"] == len(NAMES), ready
        assert request("GET", "/metrics", self.sock)[0] == 200
        node = self.thread.app[NODE]
        for inv_id, inv in list(node.engine.invocations.items()):  # an accepted start: end it
            st_, ended = self.post(f"/v1/invocations/{quote(inv_id, safe='')}/end", b"{}")
            assert st_ == 200 and ended["invocation"] == inv_id, ended
            assert inv.container_id in node.actuator.managed
        assert set(node.actuator.managed) == set(self.containers)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if os.geteuid() != 0:
        pytest.skip("real cgroup v1 test skipped: needs root to create cgroups")
    parent = f"faasrm-test/fuzz-{uuid.uuid4().hex[:8]}"
    try:
        made = [cgroups.create_v1(f"{parent}/{n}") for n in NAMES]
    except cgroups.CgroupError as exc:
        pytest.skip(f"real cgroup v1 test skipped: cannot create a cgroup: {exc}")
    tmp = tmp_path_factory.mktemp("hooks")
    cfg = config.from_dict(
        {
            "server": {"port": 0, "socket": str(tmp / "sidecar.sock")},
            "grid": {"cpu_unit_cores": 0.25},
            "sampler": {"tick_s": 0.05},
            "actuation": {"state_file": str(tmp / "state.json")},
            "spool": {"dir": str(tmp / "spool")},
            "model": {"path": str(write_policy(tmp / "harvest.onnx", "harvest"))},
            "cgroupfs": {
                "version": 1,
                "parent": parent,
                "default_cpu_cores": USER[0],
                "default_mem_mb": USER[1] / MB,
            },
        }
    )
    thread = AppThread(cfg).start()
    try:
        yield Server(thread, parent)
    finally:
        thread.stop()
        for cg in made:
            cg.close()
        for n in NAMES:
            cgroups.remove_v1(f"{parent}/{n}")
        cgroups.remove_v1(parent)
    assert thread.error is None, thread.error


def _limits(rel: str) -> tuple[float, int]:
    lim = cgroups.CgroupV1(rel).read_limits()
    return lim.cpu_quota_cores, lim.mem_limit_bytes


# ------------------------------------------------------------------------------ regressions
def test_sizes_the_kernel_or_the_host_cannot_take_get_400(server: Server) -> None:
    cid = server.containers[0]
    for user, reason in bad_user_sizes(server.thread.app[NODE].engine.host_cores):
        body = json.dumps({"container": cid, "user": user}).encode()
        status, answer = server.post("/v1/invocations", body)
        assert status == 400 and reason in answer["error"], (user, answer)
        server.check(status, answer)
        assert _limits(cid) == USER  # nothing was written, the saved user size is unchanged
    # the edges are accepted, applied and restored; later decisions still work
    for user in ({"cpu_cores": 0.01, "mem_mb": 16}, {"cpu_cores": 1.0, "mem_mb": 256}):
        status, s = server.post(
            "/v1/invocations", json.dumps({"container": cid, "user": user}).encode()
        )
        assert status == 200 and s["applied"], s
        server.check(status, s)
        assert _limits(cid) == (user["cpu_cores"], user["mem_mb"] * MB)


def test_deep_nesting_and_huge_integers_get_400(server: Server) -> None:
    cid = server.containers[1]
    for body in bad_start_bodies(cid):
        status, answer = server.post("/v1/invocations", body)
        assert status == 400, (body[:80], status, answer)
        server.check(status, answer)
    status, s = server.post("/v1/invocations", json.dumps({"container": cid}).encode())
    assert status == 200
    for body in bad_end_bodies():
        status, answer = server.post(f"/v1/invocations/{s['invocation']}/end", body)
        assert status == 400, (body[:80], status, answer)
    status, answer = server.post(f"/v1/invocations/{s['invocation']}/end", b"{}")
    assert status == 200
    server.check(status, answer)


# ------------------------------------------------------------------------------ fuzzing
settings.register_profile(
    "hooks",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

NUMBERS = st.one_of(
    st.integers(-(2**1400), 2**1400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 0.01, 0.001, 1e-6, 16, 2**30, 1e15, 1e16, 86_400, 1e300, -1]),
)
CHARS = st.characters(exclude_categories=())
"""Every code point: control characters, and lone surrogates (JSON can carry ``"\\ud800"``)."""
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(CHARS, max_size=30))
VALUES = st.recursive(
    SCALARS,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=20,
)


def _encode(obj: Any) -> bytes:
    """JSON as a client could send it: NaN and Infinity literals included."""
    return json.dumps(obj, allow_nan=True).encode()


@st.composite
def start_bodies(draw: st.DrawFn, containers: list[str]) -> dict:
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["container"] = draw(st.one_of(st.sampled_from(containers), VALUES))
    for key in ("function", "id", "input_size", "pending"):
        if draw(st.integers(0, 3)) == 0:
            body[key] = draw(
                st.one_of(VALUES, NUMBERS, st.text(CHARS, min_size=1, max_size=600))
                if key in ("function", "id")
                else st.one_of(NUMBERS, VALUES)
            )
    if draw(st.booleans()):
        user = {
            k: draw(st.one_of(NUMBERS, VALUES))
            for k in ("cpu_cores", "mem_mb", "cpu_weight")
            if draw(st.booleans())
        }
        body["user"] = draw(st.one_of(st.just(user), VALUES))
    if draw(st.integers(0, 5)) == 0:
        body[draw(st.text(max_size=10))] = draw(VALUES)
    return body


@settings(settings.get_profile("hooks"))
@given(data=st.data())
def test_fuzz_start(server: Server, v1_root: None, data: st.DataObject) -> None:
    body = _encode(data.draw(start_bodies(server.containers[:2])))  # the third: test_fuzz_end
    status, answer = server.post("/v1/invocations", body)
    server.check(status, answer)


@settings(settings.get_profile("hooks"))
@given(obj=VALUES)
def test_fuzz_arbitrary_json(server: Server, v1_root: None, obj: Any) -> None:
    for path in ("/v1/invocations", "/v1/invocations/x/end"):
        status, answer = server.post(path, _encode(obj))
        server.check(status, answer)


@settings(settings.get_profile("hooks"))
@given(
    start=st.booleans(),
    bad_id=st.text(min_size=1, max_size=40),
    end=st.dictionaries(
        st.sampled_from(["outcome", "duration_s", "extra"]),
        st.one_of(st.sampled_from(["success", "failure", "oom", "lost"]), NUMBERS, VALUES),
        max_size=3,
    ),
)
def test_fuzz_end(server: Server, v1_root: None, start: bool, bad_id: str, end: dict) -> None:
    inv_id = bad_id
    if start:
        status, s = server.post("/v1/invocations", _encode({"container": server.containers[2]}))
        assert status == 200, s
        inv_id = s["invocation"]
    status, answer = server.post(f"/v1/invocations/{quote(inv_id, safe='')}/end", _encode(end))
    server.check(status, answer)
    if status == 200:
        ok = answer["duration_s"]
        assert math.isfinite(ok) and ok >= 0, answer
        assert _limits(server.containers[2]) == USER  # the end restored the user's size


def _read_paths() -> list[str]:
    """Every GET route the daemon serves, from ``add_routes`` itself: a new one is fuzzed too."""
    app = web.Application()
    add_routes(app, CollectorRegistry())
    return sorted({r.resource.canonical for r in app.router.routes() if r.method == "GET"})


READ_PATHS = _read_paths()


@pytest.mark.parametrize("path", READ_PATHS)
@settings(settings.get_profile("hooks"), max_examples=60)
@given(
    query=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(["function", "container", "limit"]), st.text(max_size=8)),
            st.one_of(
                st.sampled_from(["resize", "a@1", "0", "-1", "1e9", "nan", "100000", "1" * 400]),
                NUMBERS.map(str),
                st.text(max_size=30),
            ),
        ),
        max_size=4,
    ),
)
def test_fuzz_read_endpoints(
    server: Server, v1_root: None, path: str, query: list[tuple[str, str]]
) -> None:
    """Every GET route with any query string: 200 or a 4xx with a reason, never a 5xx, and
    nothing lost (``Server.check``)."""
    if server.containers[0] not in [v for _, v in query] and query:  # a known container, too
        query = [*query, ("container", server.containers[0])]
    status, answer = request("GET", f"{path}?{urlencode(query)}", server.sock)
    server.check(status, answer)
