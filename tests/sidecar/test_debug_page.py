"""``GET /debug/`` in a real headless browser (Debian's chromium) against a running sidecar with
real cgroups: the rows render, their values are those of ``/debug/containers``, the allocations
and the timeline show, nothing the page does is refused or throws. The screenshot is kept as
``out/debug_page.png``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from browser import Chromium
from daemon_helpers import Daemon, free_port, write_config
from sidecar_helpers import MB, write_policy

pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "out" / "debug_page.png"

ROWS = """(() => {
  const out = {};
  for (const tr of document.querySelectorAll("#containers tbody tr")) {
    out[tr.dataset.id] = Object.fromEntries([...tr.cells].map((c) => [c.dataset.k, c.textContent]));
  }
  return out;
})()"""
ALLOCATIONS = """[...document.querySelectorAll("#allocations tbody tr")].map((tr) =>
  Object.fromEntries([["invocation", tr.dataset.invocation],
                      ...[...tr.cells].map((c) => [c.dataset.k, c.textContent])]))"""
# the timeline drew something: a canvas with non-transparent pixels besides its axes
DRAWN = """["cpu", "mem"].every((id) => {
  const c = document.getElementById(id);
  const px = c.getContext("2d").getImageData(50, 0, c.width - 60, c.height - 20).data;
  for (let i = 3; i < px.length; i += 4) if (px[i] > 0) return true;
  return false;
})"""


def _cores(x: float | None) -> str:
    return "none" if x is None else f"{x:.2f}"


def _mb(x: int | None) -> str:
    return "none" if x is None else str(round(x / MB))


def test_debug_page_in_chromium_shows_what_debug_containers_says(
    tmp_path: Path, boxes, debian_tool
) -> None:
    binary = debian_tool("chromium", ["chromium", "fonts-dejavu-core"], "the browser test")
    busy, idle = boxes("resize@1"), boxes("thumb@1")
    idle.send("mem 40")  # an idle container holding some memory
    idle.wait_done()
    port = free_port()
    spec = {busy.rel: ("resize", 1.0, 256), idle.rel: ("thumb", 0.5, 128)}
    cfg = write_config(tmp_path, port, spec, write_policy(tmp_path / "p.onnx", "harvest"))
    d = Daemon(cfg, port, tmp_path / "daemon.log")
    browser = None
    try:
        d.wait_ready()
        start = {"container": busy.rel, "function": "resize"}
        status, first = d.call("/v1/invocations", start)  # the first run: the user's size
        assert status == 200, first
        assert d.call(f"/v1/invocations/{first['invocation']}/end", {"duration_s": 0.5})[0] == 200
        status, running = d.call("/v1/invocations", start)
        assert status == 200 and running["allocation"]["kind"] == "harvested", running
        busy.send("duty 60 0.15")  # light work for the timeline, well under the harvested quota

        async def look(page):
            await page.wait_for(
                f"document.querySelector('#containers tr[data-id=\"{idle.rel}\"]') !== null"
                " && document.querySelectorAll('#allocations tbody tr').length === 2"
            )
            await page.wait_for(DRAWN)
            history = f"/debug/history?container={busy.rel}"  # 3 s of the timeline drawn
            await page.wait_for(
                f"fetch('{history}').then((r) => r.json()).then((h) => h.t.length >= 30)"
            )
            await asyncio.sleep(1.2)  # the page's next refresh draws them
            rows = await page.evaluate(ROWS)
            allocations = await page.evaluate(ALLOCATIONS)
            selected = await page.evaluate("document.getElementById('selected').textContent")
            png = await page.screenshot(SCREENSHOT)
            return rows, allocations, selected, png, list(page.errors)

        browser = Chromium(binary, tmp_path / "profile", tmp_path / "chromium.log")
        rows, allocations, selected, png, errors = asyncio.run(browser.run(d.url("/debug/"), look))
        status, view = d.call("/debug/containers")
        assert status == 200
    finally:
        if browser is not None:
            browser.close()
        d.stop()
    assert errors == []  # no exception, no refused load (the CSP allows this server only)
    by_id = {c["id"]: c for c in view["containers"]}
    assert set(rows) == set(by_id) == {busy.rel, idle.rel}
    for cid, row in rows.items():
        c = by_id[cid]
        assert row["function"] == c["function"]
        assert row["user_cores"] == _cores(c["user"]["cpu_cores"])
        assert row["user_mb"] == _mb(c["user"]["mem_bytes"])
        assert row["limit_cores"] == _cores(c["limits"]["cpu_cores"])
        assert row["limit_mb"] == _mb(c["limits"]["mem_bytes"])  # v1: no memory.high
        assert abs(float(row["used_mb"]) - c["usage"]["mem_bytes"] / MB) <= 2  # a second apart
        assert row["sampled"] == ("every tick" if c["every_tick"] else "once a second")
    assert rows[busy.rel]["now"] == "harvested" and rows[idle.rel]["now"] == "idle"
    assert float(rows[busy.rel]["limit_cores"]) == running["allocation"]["cpu_cores"] < 1.0
    assert float(rows[idle.rel]["used_mb"]) >= 40 and rows[idle.rel]["user_cores"] == "0.50"
    assert [a["invocation"] for a in allocations] == [running["invocation"], first["invocation"]]
    assert [a["outcome"] for a in allocations] == ["running", "success"]
    assert allocations[0]["kind"] == "harvested" and allocations[0]["reason"] == running["reason"]
    assert allocations[1]["duration_s"] == "0.500"
    assert selected.startswith(busy.rel)  # the running container's timeline is shown first
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
