"""The node in-process over real v1 cgroups and processes: what happens to a container between two
ticks (a run killed and reported before any tick saw it). The node's methods are called from the
test's own coroutine, so no tick or OOM wake-up runs between two calls unless the test awaits."""

from __future__ import annotations

import asyncio
from pathlib import Path

from daemon_helpers import write_config
from sidecar_helpers import MB, write_policy
from test_api import _client

from sidecar import config
from sidecar.node import NODE, Node


def _metric(node: Node, name: str) -> float:
    return node.metrics.registry.get_sample_value(name) or 0.0


def test_a_harvested_run_killed_before_any_tick_counts_one_harvested_kill(
    tmp_path: Path, boxes
) -> None:
    """The kernel kills a task of a harvested run and the invoker ends the run before a tick reads
    the kill counter: the end's own read finds the kill, so the run is an ``oom`` and the kill is
    counted then, as a harvested one. The ticks that read the counter afterwards (the OOM wake-up,
    the slow tick) count nothing more and charge the function no second failure."""
    box = boxes("oomh@1")
    cfg_path = write_config(
        tmp_path,
        0,
        {box.rel: ("fo", 1.0, 512)},
        write_policy(tmp_path / "h.onnx", "harvest"),
        actuation="v1_memory_harvest = 'hard'",
    )
    cfg = config.load(cfg_path)

    async def main() -> None:
        client = await _client(cfg, cfg_path)
        node = client.server.app[NODE]
        try:
            first = node.start(box.rel, function="fo")  # the user's size: its usual 20 MB
            box.send("mem 20")
            box.wait_done()
            node.end(first.invocation.id)
            box.send("free")
            box.wait_done()
            res = node.start(box.rel, function="fo")
            assert res.applied and res.invocation.trace["kind"] == "harvested", res
            assert box.mem_limit() < 256 * MB
            box.send("mem 300")  # past the harvested hard limit: killed
            box.proc.wait(timeout=20)  # the loop is blocked: no tick, no OOM wake-up
            assert box.oom_kills() == 1
            ended = node.end(res.invocation.id, "failure")
            assert ended.outcome == "oom"
            assert _metric(node, "faasrm_oom_kills_total") == 1.0
            assert _metric(node, "faasrm_harvested_oom_kills_total") == 1.0
            await asyncio.sleep(1.5)  # the OOM wake-up and a slow tick read the counter
            last = node.sampler.last(box.rel)
            assert last is not None and last.oom_kills == 1  # a tick saw the kill too
            assert _metric(node, "faasrm_oom_kills_total") == 1.0
            assert _metric(node, "faasrm_harvested_oom_kills_total") == 1.0
            assert node.engine.guards["fo"].failures == 1
        finally:
            await client.close()

    asyncio.run(main())
