"""``faasrm bench sidecar``: the daemon's costs on real cgroups, each beside a baseline.

* tick CPU: the daemon's own ``Node.tick`` (sample every container through kept fds, per-sample
  peaks/give-back/OOM checks, metrics) at 10 Hz on monotonic deadlines, with an invocation
  running in every container; process CPU time per tick as % of one core, at 10 and 100
  containers. Baseline: reading the same files with open/read/close per file.
* decision latency: ``Engine.start`` (stats, safeguard, features, inference, argmax), p50/p99.
  Baseline: the scorer's inference alone on the same rows.
* actuation latency: ``Actuator.apply`` of a harvest allocation (CPU quota + shares + memory
  limit), p50/p99. Baseline: one raw write of ``cpu.cfs_quota_us``. Also shown: start hook to
  limits in place (``Node.start``: usage read, peak reset, decision, actuation).

Creates its own cgroups under ``faasrm-bench-<uuid>`` (needs root and writable v1 hierarchies)
and removes them at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from sidecar import cgroups
from sidecar.config import (
    ActuationConfig,
    CgroupfsConfig,
    Config,
    ContainerConfig,
    ModelConfig,
    SpoolConfig,
)
from sidecar.core.grid import ResourceGrid
from sidecar.engine import Target
from sidecar.units import MB

KEYS = (
    "tick_cpu_pct_10",
    "tick_cpu_pct_100",
    "decision_p50_us",
    "decision_p99_us",
    "actuation_p50_ms",
    "actuation_p99_ms",
)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _random_model(path: Path) -> str:
    """A random 32/16 tanh MLP as ONNX (needs the ``onnx`` package); returns a description."""
    from onnx import TensorProto, helper, numpy_helper

    from sidecar.core.features import FEATURE_VERSION, N_FEATURES, schema_hash
    from sidecar.core.policy import MLPScorer

    m = MLPScorer.random(N_FEATURES, (32, 16), seed=0)
    inits, nodes, x = [], [], "rows"
    for i, (w, b) in enumerate(zip(m.weights, m.biases)):
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"z{i}"]),
        ]
        x = f"z{i}"
        if i < len(m.weights) - 1:
            nodes.append(helper.make_node("Tanh", [x], [f"h{i}"]))
            x = f"h{i}"
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "flat"))
    nodes.append(helper.make_node("Reshape", [x, "flat"], ["scores"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(
        model, {"feature_version": str(FEATURE_VERSION), "schema_hash": schema_hash()}
    )
    path.write_bytes(model.SerializeToString())
    return "random 32/16 tanh MLP (ONNX)"


def _grid_for(model: str) -> ResourceGrid:
    """The grid the model declares in its metadata (a trained model only loads on its own
    grid); else 0.25-core x 8 / 64 MB x 8, which suits this 2-core host."""
    from sidecar.models import model_grid

    default = ResourceGrid(0.25, 8, 64.0, 8)
    return (model_grid(model) if model else None) or default


def _node(rels: list[str], tmp: Path, model: str):
    from sidecar.actuator import Actuator
    from sidecar.daemon import host_capacity, make_runtimes
    from sidecar.metrics import Metrics
    from sidecar.models import ModelManager
    from sidecar.node import Node
    from sidecar.spool import Spool

    tag = uuid.uuid4().hex[:6]
    cfg = Config(
        grid=_grid_for(model),
        actuation=ActuationConfig(state_file=str(tmp / f"state-{tag}.json")),
        cgroupfs=CgroupfsConfig(
            version=1,
            containers=[
                ContainerConfig(path=r, function=f"f{i % 20}", cpu_cores=1.0, mem_mb=256.0)
                for i, r in enumerate(rels)
            ],
        ),
        model=ModelConfig(path=model),
        spool=SpoolConfig(dir=str(tmp / f"spool-{tag}")),
    )
    models = ModelManager(cfg.grid, cfg.model.path)
    if model and not models.load():
        raise SystemExit(f"model rejected: {models.last_error}")
    cores, mem_mb = host_capacity()
    node = Node(
        cfg,
        runtimes=make_runtimes(cfg),
        actuator=Actuator(cfg.actuation.state_file, 16 * MB),
        models=models,
        spool=Spool(cfg.spool.dir, cfg.spool.max_bytes, cfg.spool.segment_bytes),
        metrics=Metrics(),
        host_cores=cores,
        host_mem_mb=mem_mb,
    )
    node.sync_containers()
    return node


def _tick_cpu(node, n_ticks: int) -> float:
    """Process CPU per tick over n_ticks real 100 ms ticks, as % of one core."""
    from sidecar.sampler import Ticker

    for cid in list(node.engine.containers):
        node.start(cid)

    async def loop() -> float:
        ticker = Ticker(node.cfg.sampler.tick_s)
        node.tick()  # open the fds
        await ticker.wait()
        c0 = time.process_time()
        for _ in range(n_ticks):
            node.tick()
            await ticker.wait()
        return time.process_time() - c0

    cpu = asyncio.run(loop())
    for inv in list(node.engine.invocations):
        node.end(inv)
    return cpu / n_ticks / node.cfg.sampler.tick_s * 100


def _raw_read_cpu(rels: list[str], n_ticks: int, tick_s: float = 0.1) -> float:
    """The baseline: the same five files per container with open/read/close, same 10 Hz schedule."""
    from sidecar.sampler import Ticker

    root = cgroups.DEFAULT_ROOT
    files = []
    for rel in rels:
        files += [
            f"{root}/cpuacct/{rel}/cpuacct.usage",
            f"{root}/cpu/{rel}/cpu.stat",
            f"{root}/memory/{rel}/memory.usage_in_bytes",
            f"{root}/memory/{rel}/memory.max_usage_in_bytes",
            f"{root}/memory/{rel}/memory.oom_control",
        ]

    def read_all() -> None:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.read(fd, 4096)
            os.close(fd)

    async def loop() -> float:
        ticker = Ticker(tick_s)
        await ticker.wait()
        c0 = time.process_time()
        for _ in range(n_ticks):
            read_all()
            await ticker.wait()
        return time.process_time() - c0

    return asyncio.run(loop()) / n_ticks / tick_s * 100


def _decisions(node, n: int) -> tuple[list[float], list[float]]:
    from sidecar.cgroups import Usage

    eng = node.engine
    cids = list(eng.containers)
    rng = np.random.default_rng(0)
    times, infer = [], []
    scorer, _ = node.models.get()
    for i in range(n):
        cid = cids[i % len(cids)]
        u0 = Usage(0.0, 0.0, 0, 0.0, int(rng.uniform(5, 60) * MB), -1, 0, None)
        inv = eng.start(cid, usage=u0)
        if i >= 200:  # warm-up excluded
            times.append(inv.decision_s)
            rows = np.ascontiguousarray(
                np.concatenate(
                    [
                        np.broadcast_to(inv.ctx, (eng.grid.n, inv.ctx.shape[0])),
                        np.zeros((eng.grid.n, 6), np.float32),
                    ],
                    axis=1,
                ),
                dtype=np.float32,
            )
            t0 = time.perf_counter()
            scorer.scores(rows)
            infer.append(time.perf_counter() - t0)
        dur = float(rng.uniform(0.05, 2.0))
        u1 = Usage(
            0.0,
            dur * float(rng.uniform(0.1, 1.0)),
            0,
            0.0,
            u0.mem_bytes,
            int(u0.mem_bytes * rng.uniform(1.0, 1.5)),
            0,
            None,
        )
        eng.end(inv.id, usage=u1, duration_s=dur, now_s=inv.start_s + dur)
    return times, infer


def _actuation(node, n: int) -> tuple[list[float], list[float], list[float]]:
    cid = next(iter(node.engine.containers))
    applied, hooks, raw = [], [], []
    for i in range(n):
        _t, _ = node.actuator.apply(
            cid, Target(0.25 * (1 + i % 3), 25, (64 + 64 * (i % 2)) * MB, None), "b"
        )
        _, took = node.actuator.apply(cid, Target(0.5 + 0.25 * (i % 3), 50, 192 * MB, None), "b")
        applied.append(took)
        node.actuator.restore(cid)
    for _ in range(n):
        t0 = time.perf_counter()
        res = node.start(cid)
        hooks.append(time.perf_counter() - t0)
        node.end(res.invocation.id)
    path = f"{cgroups.DEFAULT_ROOT}/cpu/{cid}/cpu.cfs_quota_us"
    for i in range(n):
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, b"50000\n" if i % 2 else b"75000\n")
        os.close(fd)
        raw.append(time.perf_counter() - t0)
    node.actuator.restore(cid)
    return applied, hooks, raw


def run(args: argparse.Namespace) -> dict:
    from sidecar.models import default_model_path

    parent = f"faasrm-bench-{uuid.uuid4().hex[:8]}"
    rels = [f"{parent}/c{i:03d}" for i in range(100)]
    with tempfile.TemporaryDirectory(prefix="faasrm-bench-") as tmpdir:
        tmp = Path(tmpdir)
        model = args.model or (str(default_model_path()) if default_model_path().exists() else "")
        model_desc = model
        if not model:
            try:
                model = str(tmp / "random.onnx")
                model_desc = _random_model(Path(model))
            except ImportError:
                model, model_desc = "", "RuleScorer fallback (no model, no onnx package)"
        try:
            for rel in rels:
                cgroups.create_v1(rel)
            node10, node100 = _node(rels[:10], tmp, model), _node(rels, tmp, model)
            tick10 = _tick_cpu(node10, args.ticks)
            tick100 = _tick_cpu(node100, args.ticks)
            raw100 = _raw_read_cpu(rels, args.ticks)
            dec, inf = _decisions(node100, args.decisions)
            act, hook, raw = _actuation(node10, args.actuations)
            for node in (node10, node100):
                node.shutdown()
        finally:
            for rel in rels:
                cgroups.remove_v1(rel)
            for c in cgroups.V1_CONTROLLERS:
                try:
                    os.rmdir(f"{cgroups.DEFAULT_ROOT}/{c}/{parent}")
                except OSError:
                    pass
    figures = {
        "tick_cpu_pct_10": round(tick10, 3),
        "tick_cpu_pct_100": round(tick100, 3),
        "decision_p50_us": round(_pct(dec, 50) * 1e6, 1),
        "decision_p99_us": round(_pct(dec, 99) * 1e6, 1),
        "actuation_p50_ms": round(_pct(act, 50) * 1e3, 4),
        "actuation_p99_ms": round(_pct(act, 99) * 1e3, 4),
    }
    extra = {
        "model": model_desc,
        "raw_read_cpu_pct_100": round(raw100, 3),
        "inference_p50_us": round(_pct(inf, 50) * 1e6, 1),
        "inference_p99_us": round(_pct(inf, 99) * 1e6, 1),
        "hook_p50_ms": round(_pct(hook, 50) * 1e3, 4),
        "hook_p99_ms": round(_pct(hook, 99) * 1e3, 4),
        "raw_write_p50_ms": round(_pct(raw, 50) * 1e3, 4),
        "raw_write_p99_ms": round(_pct(raw, 99) * 1e3, 4),
    }
    return {**figures, "_extra": extra}


def main(args: argparse.Namespace) -> int:
    from sidecar.config import CgroupfsConfig  # noqa: F401  (config import check)

    if os.geteuid() != 0 or not os.access(f"{cgroups.DEFAULT_ROOT}/cpu", os.W_OK):
        raise ValueError("bench sidecar needs root and writable cgroup v1 hierarchies")
    res = run(args)
    x = res.pop("_extra")
    print(f"policy: {x['model']}")
    print(
        f"tick CPU, 10 containers:   {res['tick_cpu_pct_10']:.3f} % of one core (budget 1 % at 100)"
    )
    print(
        f"tick CPU, 100 containers:  {res['tick_cpu_pct_100']:.3f} % of one core "
        f"(open/read/close of the same files, same schedule: {x['raw_read_cpu_pct_100']:.3f} %)"
    )
    print(
        f"decision latency:          p50 {res['decision_p50_us']:.1f} us, "
        f"p99 {res['decision_p99_us']:.1f} us (target p99 <= 200; inference alone "
        f"p50 {x['inference_p50_us']:.1f}, p99 {x['inference_p99_us']:.1f})"
    )
    print(
        f"actuation latency:         p50 {res['actuation_p50_ms']:.4f} ms, "
        f"p99 {res['actuation_p99_ms']:.4f} ms "
        f"(one raw quota write: p50 {x['raw_write_p50_ms']:.4f}, p99 {x['raw_write_p99_ms']:.4f})"
    )
    print(
        f"start hook -> in place:    p50 {x['hook_p50_ms']:.4f} ms, "
        f"p99 {x['hook_p99_ms']:.4f} ms (target 5 ms)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({k: res[k] for k in KEYS}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
