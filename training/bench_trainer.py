"""``faasrm bench trainer``: ingest throughput and model propagation, each beside a baseline.

* ingest_transitions_per_s: realistic trajectory records (the sidecar's record layout, 8x8
  grid), ``--batch-records`` per batch (the shipper's ``batch_records`` default when not given),
  POSTed over 127.0.0.1 by 2 concurrent clients in this process to a real ``faasrm trainer
  serve`` child process (learner off; client and server do not share an event loop); wall time
  until the last 2xx, i.e. every record validated and committed with fsync. Baseline: decoding
  the same bodies with ``msgpack.unpackb`` alone, in this process (the floor of any validating
  ingest).
* healthz_p99_ms_under_flood: the 99th percentile of ``/healthz`` answer times (one probe every
  10 ms over a keep-alive connection, from a thread of this process) while 2 clients POST
  maximum-size batches back to back (``--flood-records`` per batch, 15,000 by default: 14.7 MiB,
  just under the default ``max_body_bytes``) into a real trainer process with its default ingest
  settings. A stalled event loop shows here first (target < 50 ms). Baseline: the same probes
  with no flood.
* propagation_s: a model is published (promoted) while ``--nodes`` sidecars of a one-machine
  cluster long-poll the registry; time until every node's ``/debug/model`` reports it active
  (downloaded, validated, swapped). Median of 3 promotions. Baseline: the first node to have it.

The JSON file holds exactly ``KEYS``.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from sidecar.core.features import N_BLOCK, N_CONTEXT
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.record import SCHEMA_VERSION, Record

GRID = ResourceGrid(0.25, 8, 64.0, 8)
KEYS = ("ingest_transitions_per_s", "healthz_p99_ms_under_flood", "propagation_s")
"""The figures ``--json`` writes."""


def synthetic_record(
    node: str, i: int, rng: np.random.Generator, reward: float | None = -0.1
) -> dict:
    """A packed record as a sidecar ships it (on ``GRID``): random features, a mask with a few
    holes and an allowed action (also the trainer tests' records)."""
    g = GRID
    mask = np.ones(g.n, dtype=bool)
    mask[rng.integers(0, g.n, 8)] = False
    allowed = np.flatnonzero(mask)
    action = int(allowed[rng.integers(0, len(allowed))])
    return Record(
        node=node,
        invocation=f"{node}-inv-{i}",
        function=f"fn{i % 3}",
        container=f"c{i % 2}",
        time=1.7e9 + i,
        grid=g,
        model="sha256:000000000000",
        context=rng.normal(0, 1, N_CONTEXT).round(4),
        cpu_block=rng.normal(0, 1, (g.cpu_units, N_BLOCK)).round(4),
        mem_block=rng.normal(0, 1, (g.mem_units, N_BLOCK)).round(4),
        mask=mask,
        action=action,
        logp=float(-np.log(len(allowed))),
        user=Alloc(4, 4),
        alloc=g.alloc(action),
        reason="cpu=harvest,mem=harvest",
        reward=reward,
        baseline_s=0.2,
        duration_s=0.2 + 0.01 * (i % 5),
        outcome="success",
        cpu_peak_cores=0.4,
        mem_peak_mb=40.0,
        give_backs=[],
        inferred=False,
    ).pack()


def pack_batch(
    node: str, seq: int, records: list[dict], schema_version: int = SCHEMA_VERSION
) -> bytes:
    """A ``POST /v1/trajectories`` body as a sidecar's shipper sends it."""
    return msgpack.packb(
        {"schema_version": schema_version, "node_id": node, "seq": seq, "records": records},
        use_bin_type=True,
    )


def make_bodies(n_batches: int, per_batch: int, nodes: int = 10) -> list[bytes]:
    rng = np.random.default_rng(0)
    template = [
        synthetic_record("node0", i, rng, float(rng.normal(0, 0.3))) for i in range(per_batch)
    ]
    bodies = []
    for b in range(n_batches):
        node = f"node{b % nodes}"
        recs = [dict(r, node=node, invocation=f"{node}-{b}-{i}") for i, r in enumerate(template)]
        bodies.append(pack_batch(node, b // nodes, recs))
    return bodies


def decode_baseline(bodies: list[bytes], per_batch: int) -> float:
    t0 = time.perf_counter()
    for body in bodies:
        msgpack.unpackb(body, raw=False)
    return len(bodies) * per_batch / (time.perf_counter() - t0)


async def _post_all(url: str, token: str, bodies: list[bytes], concurrency: int = 2) -> float:
    import aiohttp

    queue = list(enumerate(bodies))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/msgpack"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            _, body = queue.pop()
            async with session.post(url, data=body, headers=headers) as r:
                assert r.status == 200, (r.status, await r.text())
                await r.read()

    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.perf_counter() - t0


def bench_ingest(n_batches: int, per_batch: int | None, workdir: Path) -> dict[str, float]:
    from sidecar.config import ShipperConfig
    from training.processes import TOKEN, TrainerProcess, free_port

    per_batch = per_batch or ShipperConfig().batch_records  # what a sidecar really posts
    bodies = make_bodies(n_batches, per_batch)
    baseline = decode_baseline(bodies, per_batch)
    tr = TrainerProcess(
        workdir, free_port(), {"learner.enabled": False, "max_body_bytes": 64 * 2**20}
    )
    tr.start()
    try:
        asyncio.run(_post_all(tr.url + "/v1/trajectories", TOKEN, bodies[:2]))  # warm-up
        wall = asyncio.run(_post_all(tr.url + "/v1/trajectories", TOKEN, bodies[2:]))
    finally:
        tr.stop()
    return {
        "ingest_transitions_per_s": (n_batches - 2) * per_batch / wall,
        "baseline_msgpack_decode_per_s": baseline,
        "body_bytes_per_record": len(bodies[0]) / per_batch,
        "batch_records": per_batch,
    }


def _probe_healthz(port: int, stop: threading.Event, out: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        while True:  # at least one probe, however short the work
            t0 = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            out.append(time.perf_counter() - t0)
            if stop.wait(0.01):
                break
    finally:
        conn.close()


def _healthz_p99_ms(port: int, work: Any) -> tuple[float, int]:
    """p99 of /healthz answer times (ms) while ``work()`` runs, and how many probes ran."""
    stop, lat = threading.Event(), []
    probe = threading.Thread(target=_probe_healthz, args=(port, stop, lat), daemon=True)
    probe.start()
    try:
        work()
    finally:
        stop.set()
        probe.join(30)
    return float(np.percentile(lat, 99) * 1000), len(lat)


def bench_flood(n_batches: int, per_batch: int, workdir: Path) -> dict[str, float]:
    from training.processes import TOKEN, TrainerProcess, free_port

    bodies = make_bodies(n_batches, per_batch)
    workdir.mkdir(parents=True, exist_ok=True)
    tr = TrainerProcess(workdir, free_port(), {"learner.enabled": False})
    tr.start()
    try:
        idle_ms, _ = _healthz_p99_ms(tr.port, lambda: time.sleep(1.0))
        url = tr.url + "/v1/trajectories"
        wall: list[float] = []
        p99_ms, probes = _healthz_p99_ms(
            tr.port, lambda: wall.append(asyncio.run(_post_all(url, TOKEN, bodies)))
        )
    finally:
        tr.stop()
    return {
        "healthz_p99_ms_under_flood": p99_ms,
        "baseline_healthz_p99_ms_idle": idle_ms,
        "healthz_probes": probes,
        "flood_transitions_per_s": n_batches * per_batch / wall[0],
        "flood_batch_bytes": len(bodies[0]),
        "flood_batch_records": per_batch,
    }


def bench_propagation(nodes: int, workdir: Path, repeats: int = 3) -> dict[str, float]:
    import torch

    from training.export import export
    from training.ppo import Agent
    from training.processes import TOKEN
    from training.service import publish
    from training.testbed import Testbed

    def model(seed: int) -> tuple[Path, bytes]:
        torch.manual_seed(seed)
        agent = Agent()
        p = workdir / f"m{seed}.onnx"
        export(agent, p, args={"preset": "sample"}, grid=GRID)
        buf = io.BytesIO()
        torch.save({"agent": agent.state_dict()}, buf)
        return p, buf.getvalue()

    tb = Testbed(
        nodes=nodes,
        workers=1,
        workdir=workdir / "testbed",
        trainer_overrides={"learner.enabled": False},
    )
    all_s, first_s = [], []
    try:
        tb.start(drive=False)
        p, ck = model(0)
        tb.wait_all_on(publish(tb.trainer.url, TOKEN, p, checkpoint=ck)["version"], 60)
        for r in range(repeats):
            p, ck = model(r + 1)
            time.sleep(0.5)  # every node back in its long-poll
            t0 = time.monotonic()
            v = publish(tb.trainer.url, TOKEN, p, checkpoint=ck)["version"]
            first = None
            pending = list(tb.nodes)
            while pending:
                pending = [n for n in pending if n.active_version() != v]
                if first is None and len(pending) < nodes:
                    first = time.monotonic() - t0
                if time.monotonic() - t0 > 30:
                    raise TimeoutError(f"v{v} not on {[n.id for n in pending]}")
            all_s.append(time.monotonic() - t0)
            first_s.append(first if first is not None else all_s[-1])
    finally:
        tb.stop()
    return {
        "propagation_s": statistics.median(all_s),
        "baseline_first_node_s": statistics.median(first_s),
        "propagation_all_runs_s": all_s,
    }


def main(args: Any) -> int:
    with tempfile.TemporaryDirectory(prefix="faasrm-bench-") as d:
        work = Path(d)
        ing = bench_ingest(args.batches, args.batch_records, work)
        print(
            f"ingest: {ing['ingest_transitions_per_s']:,.0f} transitions/s into the trainer "
            f"(validated, fsynced; {ing['batch_records']} records/batch, "
            f"{ing['body_bytes_per_record']:.0f} B/record) "
            f"vs {ing['baseline_msgpack_decode_per_s']:,.0f}/s raw msgpack decode alone "
            f"(target >= 50,000/s)",
            flush=True,
        )
        flood = bench_flood(args.flood_batches, args.flood_records, work / "flood")
        print(
            f"/healthz under a flood: p99 {flood['healthz_p99_ms_under_flood']:.1f} ms over "
            f"{flood['healthz_probes']} probes while {args.flood_batches} batches of "
            f"{args.flood_records} records ({flood['flood_batch_bytes'] / 2**20:.1f} MiB each) "
            f"went in at {flood['flood_transitions_per_s']:,.0f} transitions/s vs "
            f"{flood['baseline_healthz_p99_ms_idle']:.1f} ms idle (target < 50 ms)",
            flush=True,
        )
        prop = bench_propagation(args.nodes, work)
        print(
            f"propagation: {prop['propagation_s']:.3f} s from promotion to all {args.nodes} nodes "
            f"running it (median of {len(prop['propagation_all_runs_s'])}: "
            f"{', '.join(f'{x:.3f}' for x in prop['propagation_all_runs_s'])}) vs "
            f"{prop['baseline_first_node_s']:.3f} s for the first node (target <= 2 s)",
        )
    figures = {
        "ingest_transitions_per_s": round(ing["ingest_transitions_per_s"], 1),
        "healthz_p99_ms_under_flood": round(flood["healthz_p99_ms_under_flood"], 2),
        "propagation_s": round(prop["propagation_s"], 4),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
