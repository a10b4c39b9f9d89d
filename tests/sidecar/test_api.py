"""The HTTP API in-process over v2 fixture trees: hooks, bad input, debug views, metrics, reload."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sidecar_helpers import MB, v2_container, write_policy

from sidecar import config
from sidecar.core.grid import Alloc
from sidecar.daemon import build_app, reload
from sidecar.node import NODE
from sidecar.process import Notifier

pytest.importorskip("onnxruntime")
TOKEN = "hook-token"


def _setup(
    tmp_path: Path, model_kind: str = "harvest"
) -> tuple[config.Config, Path, dict[str, Path]]:
    root = tmp_path / "cgroup"
    parent = root / "faasrm"
    parent.mkdir(parents=True)
    dirs = {n: v2_container(parent, n) for n in ("resize@1", "thumb@1")}
    model = write_policy(tmp_path / "policy.onnx", model_kind)
    text = f"""
[server]
port = 0
tcp_hooks = true
token = "{TOKEN}"
[grid]
cpu_unit_cores = 0.25
[sampler]
tick_s = 0.05
[actuation]
state_file = "{tmp_path / "state.json"}"
[spool]
dir = "{tmp_path / "spool"}"
[cgroupfs]
root = "{root}"
version = 2
parent = "faasrm"
default_cpu_cores = 2.0
default_mem_mb = 512.0
[model]
path = "{model}"
"""
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(text)
    return config.load(cfg_path), cfg_path, dirs


def run(coro):
    return asyncio.run(coro)


async def _client(cfg: config.Config, cfg_path: Path) -> TestClient:
    """The app on an aiohttp test server (TCP): hooks with the opt-in's bearer token."""
    app = build_app(cfg, str(cfg_path), notifier=Notifier(None))
    client = TestClient(TestServer(app), headers={"Authorization": f"Bearer {TOKEN}"})
    await client.start_server()
    for _ in range(100):
        r = await client.get("/readyz")
        if r.status == 200:
            break
        await asyncio.sleep(0.02)
    return client


BAD_STARTS = [
    (b"", "empty body"),
    (b"{nope", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"{}", "'container' is required"),
    (b'{"container": 3}', "non-empty string"),
    (b'{"container": "faasrm/resize@1", "colour": "red"}', "unknown field(s) colour"),
    (b'{"container": "faasrm/resize@1", "user": {"cpu_cores": -1, "mem_mb": 64}}', "cpu_cores"),
    (
        b'{"container": "faasrm/resize@1", "user": {"cpu_cores": 1, "mem_mb": 64, "x": 1}}',
        "unknown field(s) in 'user'",
    ),
    (b'{"container": "faasrm/resize@1", "user": 5}', "'user' must be an object"),
    (b'{"container": "faasrm/resize@1", "pending": 1.5}', "integer"),
    (b'{"container": "faasrm/resize@1", "input_size": "big"}', "finite number"),
    (b'{"container": "faasrm/resize@1", "input_size": NaN}', "finite number"),
]


def test_bad_requests_get_400_with_a_reason_and_the_daemon_keeps_running(tmp_path: Path) -> None:
    cfg, cfg_path, _ = _setup(tmp_path)

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        try:
            for body, reason in BAD_STARTS:
                r = await client.post("/v1/invocations", data=body)
                assert r.status == 400, body
                assert reason in (await r.json())["error"], body
            r = await client.post("/v1/invocations", json={"container": "faasrm/nope"})
            assert r.status == 404 and "unknown container" in (await r.json())["error"]
            r = await client.post("/v1/invocations/nope/end", json={"outcome": "success"})
            assert r.status == 404
            r = await client.post("/v1/invocations/x/end", data=b"{bad")
            assert r.status == 400
            r = await client.post("/v1/invocations/x/end", json={"outcome": "meh"})
            assert r.status == 400
            r = await client.get("/debug/allocations?limit=zero")
            assert r.status == 400
            assert (await client.get("/healthz")).status == 200
        finally:
            await client.close()

    run(main())


def test_hooks_over_tcp_need_the_opt_in_and_the_token(tmp_path: Path) -> None:
    cfg, cfg_path, _ = _setup(tmp_path)
    start = {"container": "faasrm/resize@1"}

    async def main(cfg: config.Config) -> list[tuple[int, str]]:
        client = await _client(cfg, cfg_path)
        try:
            out = []
            for token in ("", "wrong", TOKEN):
                r = await client.post(
                    "/v1/invocations", json=start, headers={"Authorization": f"Bearer {token}"}
                )
                out.append((r.status, (await r.json())["error"] or ""))
            r = await client.get("/readyz", headers={"Authorization": ""})
            assert r.status == 200  # reads need no token
            return out
        finally:
            await client.close()

    (none, wrong, right) = run(main(cfg))
    assert none[0] == wrong[0] == 401 and "bearer token" in none[1]
    assert right == (200, "")
    closed = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, tcp_hooks=False))
    status, reason = run(main(closed))[2]  # the opt-in off: even the right token is refused
    assert status == 403 and cfg.server.socket in reason and "tcp_hooks" in reason


def test_names_that_are_not_utf8_text_get_400_and_the_metrics_stay_up(tmp_path: Path) -> None:
    """A lone surrogate or a control character in a name would reach the metrics' labels (a
    harvested function's) and the spool, which cannot encode it: refused at the door."""
    cfg, cfg_path, _ = _setup(tmp_path)

    async def main() -> tuple[list[tuple[str, str, int, str]], int]:
        client = await _client(cfg, cfg_path)
        answers = []
        try:
            for key in ("container", "function", "id"):
                for bad in (r'"\ud800"', r'"a\u0001b"', r'"a\nb"', r'"a\u007fb"'):
                    for _ in range(2):  # the second start of a function is harvested
                        body = f'{{"container": "faasrm/resize@1", "{key}": {bad}}}'.encode()
                        r = await client.post("/v1/invocations", data=body)
                        a = await r.json()
                        answers.append((key, bad, r.status, a.get("error") or ""))
                        if r.status == 200 and key != "id":  # (a bad id has no URL to end it)
                            await client.post(f"/v1/invocations/{a['invocation']}/end")
            for key, value in (("function", "thumb"), ("id", "inv-\u00e9\u6f22")):
                r = await client.post(
                    "/v1/invocations", json={"container": "faasrm/thumb@1", key: value}
                )
                assert r.status == 200, (key, value)
                r = await client.post(f"/v1/invocations/{(await r.json())['invocation']}/end")
                assert r.status == 200
            return answers, (await client.get("/metrics")).status
        finally:
            await client.close()

    answers, metrics = run(main())
    assert metrics == 200
    for key, bad, status, error in answers:
        assert status == 400 and "control characters" in error, (key, bad, status, error)


async def _raw_post(client: TestClient, path: str, headers: bytes, body: bytes) -> int:
    """POST with header bytes as given (no client would send bytes that are not UTF-8)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + headers
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    status = int((await reader.readline()).split()[1])
    writer.close()
    return status


def test_a_token_that_is_not_utf8_is_refused_with_401(tmp_path: Path) -> None:
    cfg, cfg_path, _ = _setup(tmp_path)
    body = b'{"container": "faasrm/resize@1"}'

    async def main() -> list[int]:
        client = await _client(cfg, cfg_path)
        try:
            return [
                await _raw_post(client, "/v1/invocations", b"Authorization: Bearer \xff\r\n", body),
                await _raw_post(client, "/v1/invocations", b"Authorization: \xc3(\r\n", body),
            ]
        finally:
            await client.close()

    assert run(main()) == [401, 401]


def test_invocation_flow_harvests_on_v2_and_debug_views(tmp_path: Path) -> None:
    cfg, cfg_path, dirs = _setup(tmp_path)
    d = dirs["resize@1"]

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        try:
            ready = await (await client.get("/readyz")).json()
            assert ready["ready"] and ready["model_source"] == "onnx" and ready["containers"] == 2
            # first invocation: a safeguard run at the user's size
            r = await client.post(
                "/v1/invocations", json={"container": "faasrm/resize@1", "function": "resize"}
            )
            assert r.status == 200
            a = await r.json()
            assert (
                a["reason"] == "cpu=first,mem=first"
                and a["applied"]
                and a["allocation"]["kind"] == "user"
            )
            assert a["allocation"]["cpu_cores"] == 2.0
            pinned = a["user"]["units"]  # a calibrating run: the box is the user's size alone
            assert a["allowed"] == {"cpu_units": [pinned[0]] * 2, "mem_units": [pinned[1]] * 2}
            busy = await client.post("/v1/invocations", json={"container": "faasrm/resize@1"})
            assert busy.status == 409
            await asyncio.sleep(0.12)
            r = await client.post(
                f"/v1/invocations/{a['invocation']}/end", json={"outcome": "success"}
            )
            assert r.status == 200
            e = await r.json()
            assert e["outcome"] == "success" and e["reward"] is None and e["rfet"] is None
            # second: harvested (the model prefers the smallest allowed candidate)
            r = await client.post(
                "/v1/invocations",
                json={
                    "container": "faasrm/resize@1",
                    "function": "resize",
                    "pending": 2,
                    "input_size": 1024,
                },
            )
            b = await r.json()
            assert b["allocation"]["kind"] == "harvested", b
            box = b["allowed"]
            assert box["cpu_units"][0] < box["cpu_units"][1]  # a choice, and the smallest taken
            assert b["allocation"]["units"] == [box["cpu_units"][0], box["mem_units"][0]]
            quota, period = (d / "cpu.max").read_text().split()
            assert int(quota) / int(period) == pytest.approx(b["allocation"]["cpu_cores"])
            assert b["allocation"]["cpu_cores"] < 2.0
            if b["allocation"]["mem_bytes"] < 512 * MB:
                assert int((d / "memory.high").read_text()) == b["allocation"]["mem_bytes"]
            assert int((d / "memory.max").read_text()) == 512 * MB
            r = await client.post(
                f"/v1/invocations/{b['invocation']}/end", json={"duration_s": 0.2}
            )
            e2 = await r.json()
            assert e2["rfet"] is not None and e2["reward"] is not None
            # what it held over the 0.2 s it reported: its allocation, nothing given back
            assert e2["give_backs"] == []
            assert e2["held_core_s"] == pytest.approx(b["allocation"]["cpu_cores"] * 0.2)
            assert e2["held_mb_s"] == pytest.approx(b["allocation"]["mem_bytes"] / MB * 0.2)
            assert (d / "cpu.max").read_text().split() == ["200000", "100000"]  # restored at end
            assert (d / "memory.high").read_text().strip() == "max"
            # debug views
            allocs = await (await client.get("/debug/allocations?function=resize")).json()
            assert (
                allocs["count"] == 2 and allocs["allocations"][0]["invocation"] == b["invocation"]
            )
            assert allocs["allocations"][0]["input_size"] == 1024
            none = await (await client.get("/debug/allocations?container=faasrm/thumb@1")).json()
            assert none["count"] == 0
            cont = await (await client.get("/debug/containers")).json()
            assert {c["id"] for c in cont["containers"]} == {"faasrm/resize@1", "faasrm/thumb@1"}
            model = await (await client.get("/debug/model")).json()
            assert model["current"]["source"] == "onnx" and model["last_error"] is None
            prof = await (await client.get("/debug/profiles")).json()
            assert list(prof["functions"]) == ["resize"] and prof["count"] == 1
            one = await (await client.get("/debug/profiles?function=resize")).json()
            assert one["function"] == "resize" and one["guard"]["runs"] == 2
            assert one["stats"]["completions"] == 2 and one["guard"]["calibrate"] is None
            assert abs(one["stats"]["last_arrival_s"] - time.time()) < 60  # a Unix time
            assert (await client.get("/debug/profiles?function=nope")).status == 404
            assert (await client.get("/debug/profiles?limit=0")).status == 400
            text = await (await client.get("/metrics")).text()
            for name in (
                "faasrm_decision_latency_seconds_bucket",
                "faasrm_actuation_latency_seconds_count",
                'faasrm_limit_writes_total{outcome="ok",resource="cpu"}',
                'faasrm_safeguard_trips_total{reason="first"} 1.0',
                'faasrm_harvested_invocations_total{function="resize"} 1.0',
                "faasrm_samples_total",
                "faasrm_build_info",
            ):
                assert name in text, name
            assert "resize@1" not in text and "_created" not in text  # no container ids in labels
            # the trajectory records reached the spool
            node = client.server.app[NODE]
            recs = list(node.spool.iter_records())
            assert [r["outcome"] for r in recs] == ["success", "success"] and recs[1][
                "reward"
            ] is not None
        finally:
            await client.close()
        # shutdown restored everything
        assert (d / "cpu.max").read_text().split() == ["200000", "100000"]

    run(main())


def _every_tick(containers: dict) -> set[str]:
    return {c["id"] for c in containers["containers"] if c["every_tick"]}


def test_what_is_sampled_every_tick_and_the_page_endpoints(tmp_path: Path) -> None:
    """The sampling rule, as /debug/containers shows it: a container running an invocation or
    holding a decision's limits is read every tick, an idle one at its user's size is not (and
    its OOM kill is still seen); an OOM kill under a harvested allocation is counted apart."""
    _, cfg_path, dirs = _setup(tmp_path)
    cfg = config.load(cfg_path, {"actuation.restore_on_end": False})
    d = dirs["resize@1"]

    async def call(client: TestClient, path: str, body: dict | None = None) -> dict:
        r = await (client.get(path) if body is None else client.post(path, json=body))
        assert r.status == 200, await r.text()
        return await r.json()

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        try:
            cont = await call(client, "/debug/containers")
            assert _every_tick(cont) == set()
            (c,) = [c for c in cont["containers"] if c["id"] == "faasrm/resize@1"]
            assert c["limits"] == {
                "cpu_cores": 2.0,
                "cpu_period_us": 100_000,
                "cpu_weight": 100,
                "mem_bytes": 512 * MB,
                "mem_high_bytes": None,
            }
            assert c["usage"]["mem_bytes"] == int((d / "memory.current").read_text())
            assert c["kind"] is None and c["invocation"] is None
            start = {"container": "faasrm/resize@1", "function": "resize"}
            a = await call(client, "/v1/invocations", start)  # first run: the user's size
            assert _every_tick(await call(client, "/debug/containers")) == {"faasrm/resize@1"}
            await call(client, f"/v1/invocations/{a['invocation']}/end", {})
            assert _every_tick(await call(client, "/debug/containers")) == set()
            b = await call(client, "/v1/invocations", start)
            assert b["allocation"]["kind"] == "harvested", b
            # its harvested quota is watched: cpu.stat's throttling counters read every tick too
            watched = await call(client, "/debug/containers")
            assert {c["id"] for c in watched["containers"] if c["throttle_watched"]} == {
                "faasrm/resize@1"
            }
            (d / "memory.peak").write_text("90000000\n")  # what the kernel shows after a reset
            assert b["allocation"]["mem_bytes"] < 512 * MB
            # an OOM kill under the harvested allocation, and one in the idle container
            for name in ("resize@1", "thumb@1"):
                events = dirs[name] / "memory.events"
                events.write_text(events.read_text().replace("oom_kill 1", "oom_kill 2"))
            text = ""
            for _ in range(200):
                text = await (await client.get("/metrics")).text()
                if "faasrm_oom_kills_total 2.0" in text:
                    break
                await asyncio.sleep(0.05)
            assert "faasrm_oom_kills_total 2.0" in text
            assert "faasrm_harvested_oom_kills_total 1.0" in text
            await call(client, f"/v1/invocations/{b['invocation']}/end", {})
            # restore_on_end = false: the harvested limits stay, and so does the full rate
            cont = await call(client, "/debug/containers")
            assert _every_tick(cont) == {"faasrm/resize@1"}
            (c,) = [c for c in cont["containers"] if c["id"] == "faasrm/resize@1"]
            assert not c["throttle_watched"]  # no invocation: no throttle give-back to feed
            quota, period = (d / "cpu.max").read_text().split()
            assert c["limits"]["cpu_cores"] == int(quota) / int(period) < 2.0
            # the timeline's samples (a hot container gets one per tick)
            for _ in range(200):
                h = await call(client, "/debug/history?container=faasrm/resize@1&limit=5")
                if len(h["t"]) == 5:
                    break
                await asyncio.sleep(0.05)
            assert h["container"] == "faasrm/resize@1" and len(h["t"]) == 5
            assert len(h["cpu_cores"]) == len(h["mem_bytes"]) == 5 and h["t"] == sorted(h["t"])
            assert (await client.get("/debug/history?container=nope")).status == 404
            bad = await client.get("/debug/history?container=faasrm/resize@1&limit=0")
            assert bad.status == 400
            page = await client.get("/debug/")
            html = await page.text()
            assert page.status == 200 and page.content_type == "text/html"
            assert "default-src 'none'" in page.headers["Content-Security-Policy"]
            assert "/debug/containers" in html and "/debug/history" in html
            assert "<script src" not in html and "<link" not in html and "http" not in html
        finally:
            await client.close()

    run(main())


def test_a_stalled_loop_counts_its_skipped_ticks(tmp_path: Path) -> None:
    cfg, cfg_path, _ = _setup(tmp_path)  # tick_s = 0.05

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        try:
            time.sleep(0.5)  # blocks the event loop: the ticks due meanwhile are skipped
            text = ""
            for _ in range(100):
                text = await (await client.get("/metrics")).text()
                (line,) = [x for x in text.splitlines() if x.startswith("faasrm_tick_overruns")]
                if float(line.split()[1]) > 0:
                    break
                await asyncio.sleep(0.05)
            assert float(line.split()[1]) >= 5, line
        finally:
            await client.close()

    run(main())


def test_inferred_boundaries_keep_every_unhooked_container_at_the_full_rate(
    tmp_path: Path,
) -> None:
    _, cfg_path, _ = _setup(tmp_path)
    cfg = config.load(cfg_path, {"boundaries.infer": True})

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        try:
            cont = await (await client.get("/debug/containers")).json()
            assert _every_tick(cont) == {"faasrm/resize@1", "faasrm/thumb@1"}
        finally:
            await client.close()

    run(main())


def test_vanished_container_and_reload_with_a_bad_model(tmp_path: Path) -> None:
    cfg, cfg_path, dirs = _setup(tmp_path)

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        app = client.server.app
        node = app[NODE]
        try:
            r = await client.post("/v1/invocations", json={"container": "faasrm/thumb@1"})
            inv = (await r.json())["invocation"]
            shutil.rmtree(dirs["thumb@1"])
            node.sampler.cgroup("faasrm/thumb@1").close()  # file trees keep fds readable
            for _ in range(100):
                if "faasrm/thumb@1" not in node.engine.containers:
                    break
                await asyncio.sleep(0.02)
            assert "faasrm/thumb@1" not in node.engine.containers
            r = await client.post(f"/v1/invocations/{inv}/end")
            assert r.status == 404  # ended as lost when the container went
            lost = await (await client.get("/debug/allocations?container=faasrm/thumb@1")).json()
            assert lost["allocations"][0]["outcome"] == "lost"
            # SIGHUP with a NaN model: refused, the running model kept and the reason reported
            running = node.models.current.id
            write_policy(Path(cfg.model.path), "nan")
            assert await reload(app) is True
            model = await (await client.get("/debug/model")).json()
            assert (
                model["current"]["id"] == running and "non-finite" in model["last_error"]["reason"]
            )
            # a bad config file is refused as a whole
            cfg_path.write_text(cfg_path.read_text() + "\nbogus = 1\n")
            assert await reload(app) is False
            assert (await client.get("/healthz")).status == 200
        finally:
            await client.close()

    run(main())


def test_reload_dropping_a_container_restores_it(tmp_path: Path) -> None:
    cfg, cfg_path, dirs = _setup(tmp_path)
    d = dirs["resize@1"]

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        app = client.server.app
        node = app[NODE]
        try:
            for _ in range(2):  # calibrate, then a live harvested decision
                r = await client.post("/v1/invocations", json={"container": "faasrm/resize@1"})
                inv = (await r.json())["invocation"]
                if _ == 0:
                    await client.post(f"/v1/invocations/{inv}/end")
            assert (d / "cpu.max").read_text().split()[0] != "200000"
            # the new config lists only thumb@1: resize@1 is restored, forgotten, its run lost
            text = cfg_path.read_text().replace('parent = "faasrm"', 'parent = ""')
            text += (
                '\n[[cgroupfs.containers]]\npath = "faasrm/thumb@1"\n'
                "cpu_cores = 1.0\nmem_mb = 256.0\n"
            )
            cfg_path.write_text(text)
            assert await reload(app) is True
            assert set(node.engine.containers) == {"faasrm/thumb@1"}
            assert (d / "cpu.max").read_text().split() == ["200000", "100000"]
            assert (d / "memory.high").read_text().strip() == "max"
            r = await client.post(f"/v1/invocations/{inv}/end")
            assert r.status == 404
            assert (dirs["thumb@1"] / "cpu.max").read_text().split()[0] == "100000"  # new user size
        finally:
            await client.close()

    run(main())


def test_reload_applies_a_new_slow_every_to_the_idle_reads(tmp_path: Path) -> None:
    """``sampler.slow_every`` changed by a SIGHUP re-buckets the containers at once: an idle
    container is read every tick at ``slow_every = 1``, not once in the start-up's 10 ticks."""
    cfg, cfg_path, _ = _setup(tmp_path)

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        app = client.server.app
        node = app[NODE]
        url = "/debug/history?container=faasrm/resize@1"
        try:
            text = cfg_path.read_text().replace("tick_s = 0.05", "tick_s = 0.05\nslow_every = 1")
            cfg_path.write_text(text)
            assert await reload(app) is True
            before, ticks = len((await (await client.get(url)).json())["t"]), node.sampler.ticks
            while node.sampler.ticks < ticks + 20:
                await asyncio.sleep(0.02)
            after = len((await (await client.get(url)).json())["t"])
            assert after - before >= 18, (before, after)  # every tick, not 2 in 20
        finally:
            await client.close()

    run(main())


def test_reload_with_a_user_size_the_kernel_refuses_keeps_the_saved_one(tmp_path: Path) -> None:
    """A configured size the config allows can still be one the kernel refuses: 0.05 cores in
    the containers' own 10 ms CFS period is a 500 us quota, below the kernel's 1000 us."""
    cfg, cfg_path, dirs = _setup(tmp_path)
    for d in dirs.values():
        (d / "cpu.max").write_text("20000 10000\n")

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        app = client.server.app
        d = dirs["resize@1"]
        try:
            assert (d / "cpu.max").read_text().split() == ["20000", "10000"]  # the user's 2 cores
            text = cfg_path.read_text().replace(
                "default_cpu_cores = 2.0", "default_cpu_cores = 0.05"
            )
            cfg_path.write_text(text)
            assert await reload(app) is True  # the daemon keeps running, the old size is kept
            r = await client.post("/v1/invocations", json={"container": "faasrm/resize@1"})
            assert r.status == 200 and (await r.json())["applied"]
            quota, period = map(int, (d / "cpu.max").read_text().split())
            assert quota / period in (2.0, 1.0)  # the user's size, or a harvest of it
            assert app[NODE].actuator.managed["faasrm/resize@1"].user.cpu_quota_cores == 2.0
        finally:
            await client.close()

    run(main())


def test_a_user_size_a_hook_reports_holds_until_the_config_changes_it(tmp_path: Path) -> None:
    """A start that reports no user size (a hook that sends it once, a Docker unpause) is decided
    against the size the last hook reported, as the actuator restores to it: decided against the
    configured size instead, a harvest below the reported size read as an acceleration, with no
    give-back watching it. A start refused (409) saves no size it reported."""
    cfg, cfg_path, dirs = _setup(tmp_path)
    cfg_path.write_text(
        cfg_path.read_text()
        .replace("default_cpu_cores = 2.0", "default_cpu_cores = 1.0")
        .replace("default_mem_mb = 512.0", "default_mem_mb = 256.0")
    )
    cfg = config.load(cfg_path)
    d = dirs["resize@1"]
    reported = {"cpu_cores": 2.0, "mem_mb": 512}

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        node = client.server.app[NODE]
        try:
            r = await client.post(
                "/v1/invocations", json={"container": "faasrm/resize@1", "user": reported}
            )
            a = await r.json()
            assert a["allocation"]["kind"] == "user" and a["user"]["units"] == [8, 8], a
            for f in ("memory.current", "memory.peak"):  # the run needs 300 MB of its 512
                (d / f).write_text(f"{300 * MB}\n")
            await client.post(f"/v1/invocations/{a['invocation']}/end")
            (d / "memory.current").write_text(f"{100 * MB}\n")
            r = await client.post("/v1/invocations", json={"container": "faasrm/resize@1"})
            b = await r.json()
            assert b["user"]["units"] == [8, 8] and b["user"]["mem_bytes"] == 512 * MB, b
            assert b["allocation"]["kind"] == "harvested", b
            assert b["allocation"]["mem_bytes"] < 512 * MB
            assert int((d / "memory.high").read_text()) == b["allocation"]["mem_bytes"]
            assert int((d / "memory.max").read_text()) == 512 * MB  # the user's, as reported
            # a start refused as a duplicate saves none of the size it reported
            r = await client.post(
                "/v1/invocations",
                json={"container": "faasrm/thumb@1", "id": b["invocation"], "user": reported},
            )
            assert r.status == 409
            assert node.actuator.managed["faasrm/thumb@1"].user.cpu_quota_cores == 1.0
            assert node.engine.containers["faasrm/thumb@1"].user.cpu_cores == 1.0
            await client.post(f"/v1/invocations/{b['invocation']}/end")
            # a new configured size replaces the reported one, in the engine as in the actuator
            cfg_path.write_text(
                cfg_path.read_text().replace("default_mem_mb = 256.0", "default_mem_mb = 384.0")
            )
            assert await reload(client.server.app) is True
            assert node.engine.containers["faasrm/resize@1"].user.mem_bytes == 384 * MB
            assert node.actuator.managed["faasrm/resize@1"].user.mem_limit_bytes == 384 * MB
        finally:
            await client.close()

    run(main())


def test_a_decision_that_could_not_be_applied_is_recorded_at_the_users_size(
    tmp_path: Path,
) -> None:
    """When the limits cannot be written, the run holds the user's size: its trace says so and
    its record earns the policy no reward (it had been credited with a harvest it never made),
    and the container is put back at its user's limits once the cgroup answers again."""
    cfg, cfg_path, dirs = _setup(tmp_path)
    d = dirs["resize@1"]

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        try:
            r = await client.post("/v1/invocations", json={"container": "faasrm/resize@1"})
            first = (await r.json())["invocation"]
            await asyncio.sleep(0.12)
            await client.post(f"/v1/invocations/{first}/end")
            quota = (d / "cpu.max").read_text()
            (d / "cpu.max").unlink()
            (d / "cpu.max").mkdir()  # fails every write, as an I/O error would
            r = await client.post("/v1/invocations", json={"container": "faasrm/resize@1"})
            b = await r.json()
            assert r.status == 200 and b["applied"] is False and b["error"], b
            (d / "cpu.max").rmdir()
            (d / "cpu.max").write_text(quota)
            await asyncio.sleep(0.12)
            r = await client.post(f"/v1/invocations/{b['invocation']}/end")
            e = await r.json()
            assert e["outcome"] == "success" and e["reward"] is None, e
            allocs = await (await client.get("/debug/allocations?function=resize")).json()
            entry = allocs["allocations"][0]
            assert entry["invocation"] == b["invocation"] and entry["kind"] == "user", entry
            assert entry["chosen"]["cpu_cores"] == 2.0 and entry["applied"] is False
            for _ in range(50):  # the restore the failed write left pending is retried
                if (d / "cpu.max").read_text().split() == ["200000", "100000"]:
                    break
                await asyncio.sleep(0.05)
            assert (d / "cpu.max").read_text().split() == ["200000", "100000"]
        finally:
            await client.close()

    run(main())


class _NanScorer:
    def scores(self, rows):
        import numpy as np

        return np.full(len(rows), np.nan, np.float32)


def test_model_failing_at_run_time_is_rolled_back(tmp_path: Path) -> None:
    cfg, cfg_path, _ = _setup(tmp_path)

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        node = client.server.app[NODE]
        try:
            node.models.current.scorer = _NanScorer()  # passes validation, fails on real inputs
            for _ in range(cfg.model.max_runtime_failures):
                r = await client.post("/v1/invocations", json={"container": "faasrm/resize@1"})
                body = await r.json()
                assert r.status == 200 and body["model"] == "fallback"
                await client.post(f"/v1/invocations/{body['invocation']}/end")
            assert node.models.current.source == "fallback"
            model = await (await client.get("/debug/model")).json()
            assert "rolled back" in model["last_error"]["reason"]
            text = await (await client.get("/metrics")).text()
            assert 'faasrm_model_loads_total{outcome="rollback"} 1.0' in text
            assert "faasrm_model_failures_total 3.0" in text
        finally:
            await client.close()

    run(main())


def test_the_daemon_never_imports_torch_or_training() -> None:
    import subprocess
    import sys

    code = (
        "import sys, sidecar.daemon, sidecar.bench, sidecar.cli, sidecar.runtimes.cgroupfs\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'training'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_the_model_free_rule_decides_without_a_model_and_follows_a_reload(tmp_path: Path) -> None:
    cfg, cfg_path, _ = _setup(tmp_path)
    text = cfg_path.read_text().replace(f'path = "{cfg.model.path}"', 'path = "/nonexistent.onnx"')
    cfg_path.write_text(text + 'rule = "smallest"\n')
    cfg = config.load(cfg_path)

    async def decide(client: TestClient, node) -> Any:
        r = await client.post("/v1/invocations", json={"container": "faasrm/resize@1"})
        body = await r.json()
        inv = node.engine.invocations[body["invocation"]]
        await client.post(f"/v1/invocations/{inv.id}/end")
        return inv

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        app = client.server.app
        node = app[NODE]
        try:
            ready = await (await client.get("/readyz")).json()
            assert ready["model"] == "fallback" and "'smallest' rule" in ready["model_note"]
            assert (await (await client.get("/debug/model")).json())["rule"] == "smallest"
            await decide(client, node)  # the first run is at the user's size (safeguard)
            inv = await decide(client, node)
            g = inv.guard
            assert inv.model == "fallback" and inv.alloc == Alloc(g.cpu_lo, g.mem_lo)
            assert inv.alloc != inv.user_alloc  # it harvests
            cfg_path.write_text(cfg_path.read_text().replace('"smallest"', '"user"'))
            assert await reload(app) is True
            ready = await (await client.get("/readyz")).json()
            assert "'user' rule" in ready["model_note"]
            assert node.engine.fallback is node.models.fallback.scorer
            inv = await decide(client, node)
            g, u = inv.guard, inv.user_alloc
            closest = Alloc(
                min(max(u.cpu, g.cpu_lo), g.cpu_hi), min(max(u.mem, g.mem_lo), g.mem_hi)
            )
            assert inv.alloc == closest
        finally:
            await client.close()

    run(main())
