"""The one command line, ``faasrm``; every subcommand imports its module lazily.

``faasrm sidecar run`` must never import torch or the simulator, so nothing heavy is imported
at module level here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _sim_eval(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, plot_cdfs, render_table, write_json
    from training.sim.presets import get_preset

    preset = get_preset(args.preset)
    workload = None
    if args.trace:
        from training.traces import load_azure

        workload = preset.build(args.seed, trace=load_azure(args.trace))
    managers = [m.strip() for m in args.managers.split(",") if m.strip()]
    ev = evaluate(preset, managers, args.seed, model=args.model, workload=workload)
    print(render_table(ev))
    if args.json:
        write_json(ev, args.json)
        print(f"wrote {args.json}")
    if args.plots:
        for p in plot_cdfs(ev, args.plots):
            print(f"wrote {p}")
    return 0


def _trace_generate(args: argparse.Namespace) -> int:
    from training.traces import generate, write_azure

    trace = generate(args.functions, args.minutes, args.seed, mean_rate_per_min=args.rate)
    write_azure(trace, args.out)
    print(
        f"wrote {len(trace.functions)} functions, {trace.minutes} minutes, "
        f"{trace.total_invocations()} invocations to {args.out}"
    )
    return 0


def _bench_sim(args: argparse.Namespace) -> int:
    from training.bench import bench_sim, single_core, write_json

    single_core()
    figures = bench_sim(args.preset, args.seed, args.decisions, args.envs)
    print(
        f"simulator + MLP policy: {figures['decisions_per_s']:,.0f} decisions/s on one core "
        f"({figures['ratio_vs_fixed']:.2f}x the Fixed loop's "
        f"{figures['baseline_fixed_decisions_per_s']:,.0f}/s; "
        f"{figures['ratio_vs_reference_400']:.0f}x the reference's ~400/s)"
    )
    write_json(figures, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="faasrm",
        description="RL resource manager for serverless invoker hosts (Freyr/FaaSRM, re-built).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("sim", help="trace-driven cluster simulator").add_subparsers(
        dest="sim_command", required=True
    )
    ev = sim.add_parser("eval", help="evaluate resource managers on the same trace and seed")
    ev.add_argument("--preset", default="paper", help="simulation preset (paper, small, sample)")
    ev.add_argument(
        "--managers",
        default="fixed,greedy,ensure,vpa,oracle",
        help="comma-separated: fixed, greedy, ensure, vpa, oracle, learned",
    )
    ev.add_argument("--seed", type=int, default=1, help="workload seed (trace and every draw)")
    ev.add_argument("--trace", help="a folder of Azure Functions 2019 trace files to replay")
    ev.add_argument("--model", help="ONNX policy for the 'learned' manager (default: models/)")
    ev.add_argument("--json", help="write the figures as JSON to this path")
    ev.add_argument("--plots", help="write RFET and execution-time CDF plots (PNG) to this folder")
    ev.set_defaults(func=_sim_eval)

    trace = sub.add_parser("trace", help="workload traces").add_subparsers(
        dest="trace_command", required=True
    )
    gen = trace.add_parser("generate", help="generate an Azure-format trace")
    gen.add_argument("--functions", type=int, default=1000)
    gen.add_argument("--minutes", type=int, default=60)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--rate", type=float, help="mean invocations per minute (default: natural)")
    gen.add_argument("--out", required=True, help="folder for invocation/duration/memory.csv")
    gen.set_defaults(func=_trace_generate)

    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(
        dest="bench_command", required=True
    )
    bs = bench.add_parser("sim", help="simulator decisions per second with an MLP policy")
    bs.add_argument("--preset", default="paper")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--decisions", type=int, default=100_000)
    bs.add_argument("--envs", type=int, default=16, help="environments stepped in lockstep")
    bs.add_argument("--json", help="write the figures as JSON to this path")
    bs.set_defaults(func=_bench_sim)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"faasrm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
