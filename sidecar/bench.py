"""``faasrm bench sidecar``: the daemon's costs on real cgroups, each beside a baseline.

* tick CPU: the daemon's own ``Node.tick`` (sample the containers the tick reads through kept
  fds, per-sample peaks/give-back/OOM checks, metrics) at 10 Hz on the daemon's ``Ticker.run``;
  process CPU time per tick as % of one core, for three mixes: 100 and 1,000 containers with 10%
  of them running an invocation (an invoker host: most warm containers are idle at any moment),
  and 100 all running one. Each running invocation is a container's second (its first, at the user's
  size, calibrates the safeguard), so the tick reads them as on a warm node: harvested ones with
  their throttling watched every tick. Baseline, per mix: open/read/close of the same files on
  the same schedule (a running container's CPU and memory usage every tick, and its throttling
  when watched; its peak and throttling every ``slow_every`` ticks; an idle container's CPU and
  memory usage every ``slow_every`` ticks), alternating with the tick in ``BLOCKS`` blocks on one
  ticker so that a slow spell of the host weighs on both. One node at a time, its cgroups alone
  under their parent, as on a host of that many containers.
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
import contextlib
import json
import os
import resource
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

MIXES = {  # key suffix: (containers, share running an invocation)
    "100": (100, 0.1),
    "1000": (1000, 0.1),
    "100_all_active": (100, 1.0),
}
KEYS = (
    *(f"tick_cpu_pct_{m}" for m in MIXES),
    *(f"raw_read_cpu_pct_{m}" for m in MIXES),
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
        actuator=Actuator.for_config(cfg),
        models=models,
        spool=Spool(cfg.spool.dir, cfg.spool.max_bytes, cfg.spool.segment_bytes),
        metrics=Metrics(),
        host_cores=cores,
        host_mem_mb=mem_mb,
    )
    node.sync_containers()
    return node


def _active(n: int, share: float) -> list[bool]:
    """Which of n containers run an invocation: every k-th, spread over the slow-tick phases."""
    k = round(1 / share) if share > 0 else n + 1
    return [i % k == 0 for i in range(n)]


BLOCKS = 4
"""The tick and its baseline alternate in this many blocks: a slow spell of the host hits both."""


def _tick_cpu(
    node, rels: list[str], active: list[bool], n_ticks: int
) -> tuple[float, float, dict[str, int]]:
    """Process CPU per tick over n_ticks real 100 ms ticks, as % of one core, of the daemon's
    tick and of its baseline (``_raw_files``), in alternating blocks on one ticker; and what the
    running invocations were (their allocation kinds, and how many had their throttling watched
    every tick)."""
    from sidecar.sampler import Ticker

    for cid, busy in zip(list(node.engine.containers), active):
        if busy:  # a calibration run first: the measured one is a decision, as on a warm node
            first = node.start(cid)
            node.end(first.invocation.id, duration_s=0.2)
            node.start(cid)
    watched = node._watched()
    is_watched = [cid in watched for cid in node.engine.containers]
    phases = _raw_files(rels, active, is_watched, node.cfg.sampler.slow_every)
    per_block = max(1, n_ticks // BLOCKS)
    ticker = Ticker(node.cfg.sampler.tick_s)

    def raw_read() -> None:
        for f in phases[ticker.k % len(phases)]:
            fd = os.open(f, os.O_RDONLY)
            os.read(fd, 4096)
            os.close(fd)

    async def loop() -> tuple[float, float]:
        await ticker.run(node.tick, n=1)  # open the fds
        cpu = [0.0, 0.0]
        for _ in range(BLOCKS):
            for i, fn in enumerate((node.tick, raw_read)):
                c0 = time.process_time()
                await ticker.run(fn, n=per_block)
                cpu[i] += time.process_time() - c0
        return cpu[0], cpu[1]

    tick_cpu, raw_cpu = asyncio.run(loop())
    running: dict[str, int] = {"watched": len(watched)}
    for inv in node.engine.invocations.values():
        running[inv.trace["kind"]] = running.get(inv.trace["kind"], 0) + 1
    for inv in list(node.engine.invocations):
        node.end(inv)
    per_tick = 100 / (per_block * BLOCKS) / node.cfg.sampler.tick_s
    return tick_cpu * per_tick, raw_cpu * per_tick, running


def _raw_files(
    rels: list[str], active: list[bool], watched: list[bool], slow_every: int
) -> list[list[str]]:
    """The baseline: per tick phase, the files the daemon reads in this mix on its schedule (slow
    ticks spread as the sampler spreads them), each to be read with open/read/close."""
    root = cgroups.DEFAULT_ROOT
    fast_files, slow_files = [], []  # per container
    for rel in rels:
        fast_files.append(
            [f"{root}/cpuacct/{rel}/cpuacct.usage", f"{root}/memory/{rel}/memory.usage_in_bytes"]
        )
        slow_files.append(
            [f"{root}/cpu/{rel}/cpu.stat", f"{root}/memory/{rel}/memory.max_usage_in_bytes"]
        )
    hot = [f for i, files in enumerate(fast_files) if active[i] for f in files]
    hot += [slow_files[i][0] for i in range(len(rels)) if watched[i]]  # cpu.stat every tick
    return [
        hot
        + [
            f
            for i in range(len(rels))
            if i % slow_every == phase
            for f in (slow_files[i] if active[i] else fast_files[i])
        ]
        for phase in range(slow_every)
    ]


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


def _raise_fd_limit(needed: int) -> None:
    """The daemon keeps ~6 fds per container (its unit sets LimitNOFILE=65536): do the same."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        cap = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))


def _shipped_model() -> str:
    """The shipped model when this host would load it, else "" (a model from another feature
    schema is refused until it is retrained: the bench then scores with a random one)."""
    from sidecar.models import ModelRejected, default_model_path, validate

    path = default_model_path()
    if not path.exists():
        return ""
    try:
        validate(path.read_bytes(), _grid_for(str(path)), None)
    except ModelRejected:
        return ""
    return str(path)


def run(args: argparse.Namespace) -> dict:
    parent = f"faasrm-bench-{uuid.uuid4().hex[:8]}"
    _raise_fd_limit(8 * max(n for n, _ in MIXES.values()) + 1024)
    tick, raw, running = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="faasrm-bench-") as tmpdir:
        tmp = Path(tmpdir)
        model = args.model or _shipped_model()
        model_desc = model
        if not model:
            try:
                model = str(tmp / "random.onnx")
                model_desc = _random_model(Path(model))
            except ImportError:
                model, model_desc = "", "RuleScorer fallback (no model, no onnx package)"
        try:
            # One node at a time, its n cgroups alone under their parent: a host of n containers.
            for n in sorted({n for n, _ in MIXES.values()}):
                rels = [f"{parent}/n{n}/c{i:04d}" for i in range(n)]
                try:
                    for rel in rels:
                        cgroups.create_v1(rel)
                    node = _node(rels, tmp, model)
                    for name, (count, share) in MIXES.items():
                        if count != n:
                            continue
                        tick[name], raw[name], running[name] = _tick_cpu(
                            node, rels, _active(n, share), args.ticks
                        )
                    if n == 100:
                        dec, inf = _decisions(node, args.decisions)
                        act, hook, raw_w = _actuation(node, args.actuations)
                    node.shutdown()
                finally:
                    for rel in [*rels, f"{parent}/n{n}"]:
                        cgroups.remove_v1(rel)
        finally:
            with contextlib.suppress(cgroups.CgroupError):  # an error above is the one to see
                cgroups.remove_v1(parent)
    figures = {
        **{f"tick_cpu_pct_{m}": round(v, 3) for m, v in tick.items()},
        **{f"raw_read_cpu_pct_{m}": round(v, 3) for m, v in raw.items()},
        "decision_p50_us": round(_pct(dec, 50) * 1e6, 1),
        "decision_p99_us": round(_pct(dec, 99) * 1e6, 1),
        "actuation_p50_ms": round(_pct(act, 50) * 1e3, 4),
        "actuation_p99_ms": round(_pct(act, 99) * 1e3, 4),
    }
    extra = {
        "model": model_desc,
        "inference_p50_us": round(_pct(inf, 50) * 1e6, 1),
        "inference_p99_us": round(_pct(inf, 99) * 1e6, 1),
        "hook_p50_ms": round(_pct(hook, 50) * 1e3, 4),
        "hook_p99_ms": round(_pct(hook, 99) * 1e3, 4),
        "raw_write_p50_ms": round(_pct(raw_w, 50) * 1e3, 4),
        "raw_write_p99_ms": round(_pct(raw_w, 99) * 1e3, 4),
        **{f"running_{m}": v for m, v in running.items()},
    }
    return {**figures, "_extra": extra}


def main(args: argparse.Namespace) -> int:
    from sidecar.config import CgroupfsConfig  # noqa: F401  (config import check)

    if os.geteuid() != 0 or not os.access(f"{cgroups.DEFAULT_ROOT}/cpu", os.W_OK):
        raise ValueError("bench sidecar needs root and writable cgroup v1 hierarchies")
    res = run(args)
    x = res.pop("_extra")
    print(f"policy: {x['model']}")
    print(f"running invocations, 100 containers: {x['running_100']}")
    for m, (n, share) in MIXES.items():
        label = f"{n} containers, {share:.0%} running"
        print(
            f"tick CPU, {label + ':':<29} {res[f'tick_cpu_pct_{m}']:6.3f} % of one core "
            f"(open/read/close of the same files: {res[f'raw_read_cpu_pct_{m}']:.3f} %)"
        )
    print("  budget: 1 % of one core at 100 containers, 10 % running")
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
