"""The one command line, ``faasrm``; every subcommand imports its module lazily.

``faasrm sidecar run`` must never import torch or the simulator, so nothing heavy is imported
at module level here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.config import Config
    from training.sim.presets import Preset


def _sim_eval(args: argparse.Namespace) -> int:
    from sidecar.models import ModelRejected

    try:
        return _sim_eval_checked(args)
    except ModelRejected as exc:
        raise SystemExit(
            f"faasrm sim eval: the 'learned' model {args.model or '(shipped default)'} cannot "
            f"be used: {exc}. Train and export a model on this code's features (faasrm train, "
            "faasrm export) and pass it with --model."
        ) from None


def _preset(args: argparse.Namespace) -> Preset:
    """The named preset, with ``--decline-when-queued`` and the ``--mem-*`` flags applied to its
    safeguard and ``--restart-every`` and ``--v1-memory-harvest`` to its cluster."""
    from sidecar.config import HARD_MEM_MARGIN_UNITS
    from training.sim.presets import get_preset

    changes: dict[str, object] = {}
    if args.decline_when_queued:
        changes["decline_when_queued"] = True
    if args.mem_margin_units is not None:
        changes["mem_margin_units"] = args.mem_margin_units
    elif args.v1_memory_harvest == "hard":  # as a node's config does (HARD_MEM_MARGIN_UNITS)
        changes["mem_margin_units"] = HARD_MEM_MARGIN_UNITS
    if args.mem_margin_sd is not None:
        changes["mem_margin_sd"] = args.mem_margin_sd
    if args.mem_harvest_after is not None:
        changes["mem_harvest_after"] = args.mem_harvest_after
    preset = get_preset(args.preset).with_safeguard(**changes)
    if args.restart_every is not None:
        preset = preset.with_cluster(restart_every_s=args.restart_every)
    if args.v1_memory_harvest is not None:
        preset = preset.with_cluster(oom_hold=args.v1_memory_harvest == "hold")
    return preset


def _sim_eval_checked(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, plot_cdfs, plot_front, render_table, write_json

    preset = _preset(args)
    if args.seeds:
        return _sim_eval_seeds(args, preset)
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
        title = f"{ev.preset} preset, seed {ev.seed}"
        print(f"wrote {plot_front(ev.results, args.plots, title, f'{ev.preset}_seed{ev.seed}')}")
    return 0


def _sim_eval_seeds(args: argparse.Namespace, preset) -> int:
    from training.evaluate import (
        evaluate_seeds,
        plot_cdfs,
        plot_front,
        render_seeds_table,
        write_seeds_json,
    )

    if args.trace:
        raise SystemExit("faasrm sim eval: --seeds draws a workload per seed; --trace takes --seed")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    managers = [m.strip() for m in args.managers.split(",") if m.strip()]
    ev = evaluate_seeds(preset, managers, seeds, model=args.model)
    print(render_seeds_table(ev))
    if args.json:
        write_seeds_json(ev, args.json)
        print(f"wrote {args.json}")
    if args.plots:
        for one in ev.per_seed:
            for p in plot_cdfs(one, args.plots):
                print(f"wrote {p}")
        label = "seeds" + "-".join(map(str, seeds))
        title = f"{ev.preset} preset, seeds {','.join(map(str, seeds))} (95% intervals)"
        print(f"wrote {plot_front(ev.pooled, args.plots, title, f'{ev.preset}_{label}')}")
    return 0


def _sim_capacity(args: argparse.Namespace) -> int:
    from sidecar.models import ModelRejected
    from training.evaluate import evaluate_capacity, render_capacity

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    loads = [float(x) for x in args.loads.split(",") if x.strip()]
    managers = [m.strip() for m in args.managers.split(",") if m.strip()]
    try:
        report = evaluate_capacity(_preset(args), managers, seeds, loads, args.model)
    except ModelRejected as exc:
        raise SystemExit(
            f"faasrm sim capacity: the 'learned' model cannot be used: {exc}"
        ) from None
    except ValueError as exc:
        raise SystemExit(f"faasrm sim capacity: {exc}") from None
    print(render_capacity(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
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
    figures = bench_sim(args.preset, args.seed, args.decisions, args.envs, args.model)
    print(
        f"simulator + MLP policy: {figures['decisions_per_s']:,.0f} decisions/s on one core "
        f"({figures['ratio_vs_fixed']:.2f}x the Fixed loop's "
        f"{figures['baseline_fixed_decisions_per_s']:,.0f}/s; "
        f"{figures['ratio_vs_reference_400']:.0f}x the reference's ~400/s; "
        f"policy {figures['policy']})"
    )
    write_json(figures, args.json)
    return 0


def _sidecar_overrides(args: argparse.Namespace) -> dict:
    from sidecar.config import parse_override

    out = dict(parse_override(text) for text in args.set or [])
    for flag, key in (
        ("host", "server.host"),
        ("port", "server.port"),
        ("model", "model.path"),
        ("state_file", "actuation.state_file"),
        ("spool_dir", "spool.dir"),
        ("log_level", "log_level"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    return out


def _private_dirs(cfg: Config, state_only: bool = False) -> None:
    """Refuse (ConfigError) a directory of the node's state that another user could write:
    the state file's (``state_only``), else also the spool's, the shipper's and the models'."""
    from sidecar.config import ConfigError
    from sidecar.durable import private_dir

    dirs = {"actuation.state_file": Path(cfg.actuation.state_file).parent}
    if not state_only:
        dirs["spool.dir"] = Path(cfg.spool.dir)
        if cfg.shipper.enabled:
            dirs["shipper.state_file"] = Path(cfg.shipper.state_file).parent
        if cfg.model_poller.enabled:
            dirs["model_poller.dir"] = Path(cfg.model_poller.dir)
    for key, path in dirs.items():
        try:
            private_dir(path)
        except OSError as exc:
            raise ConfigError(f"{key}: {exc}") from None


def _recover(cfg: Config) -> dict[str, str]:
    """Every container of the state file back at its user's limits (``Actuator.recover``), once
    the state file's directory is known to be root's alone."""
    from sidecar.actuator import Actuator

    _private_dirs(cfg, state_only=True)
    return Actuator.for_config(cfg).recover()


def _load_or_recover(args: argparse.Namespace) -> tuple[Config, dict]:
    """The config and its overrides. One that does not load raises, but only after the
    containers of the state file it names (else the default one) are back at their users'
    limits: no run that would restore them can start with it, so a crashed run's harvests would
    otherwise stay with nothing deciding for them."""
    from sidecar import config

    overrides = _sidecar_overrides(args)
    try:
        return config.load(args.config, overrides), overrides
    except config.ConfigError:
        state_file = overrides.get("actuation.state_file")
        if state_file is None:
            with contextlib.suppress(config.ConfigError, AttributeError):
                state_file = config.read_toml(args.config).get("actuation", {}).get("state_file")
        if not isinstance(state_file, str) or not state_file:
            state_file = config.ActuationConfig.state_file
        if Path(state_file).exists():
            try:
                _recover(config.Config(actuation=config.ActuationConfig(state_file=state_file)))
            except (OSError, ValueError) as exc:
                print(f"faasrm: cannot restore from {state_file}: {exc}", file=sys.stderr)
        raise


def _sidecar_run(args: argparse.Namespace) -> int:
    cfg, overrides = _load_or_recover(args)
    _private_dirs(cfg)
    # Crash recovery first, before the heavier imports: a previous run's containers go back to
    # their user limits well within a second (the daemon's start-up repeats it, idempotently).
    _recover(cfg)
    from sidecar.daemon import run

    return run(cfg, args.config, overrides)


def _sidecar_restore(args: argparse.Namespace) -> int:
    """Put every container of the state file back at its user's limits, as a start-up does.

    The unit's ExecStopPost: after a crash, no container waits for the restart at a harvest, or
    held at a harvested memory limit (``v1_memory_harvest = "hold"``)."""
    results = _recover(_load_or_recover(args)[0])
    print(json.dumps(results, sort_keys=True))
    return 1 if any(r.startswith("error") for r in results.values()) else 0


def _bench_sidecar(args: argparse.Namespace) -> int:
    from sidecar.bench import main as bench_main

    return bench_main(args)


def _train(args: argparse.Namespace) -> int:
    from training.ppo import main as train_main

    train_main(args.ppo_args)
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import main as export_main

    export_main([args.checkpoint, args.out])
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    from sidecar.config import parse_override

    return dict(parse_override(text) for text in args.set or [])


def _trainer_serve(args: argparse.Namespace) -> int:
    from training.service import load_config, run

    overrides = _overrides(args)
    if args.port is not None:
        overrides["port"] = args.port
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    return run(load_config(args.config, overrides))


def _trainer_publish(args: argparse.Namespace) -> int:
    import os

    from training.service import publish

    token = args.token or os.environ.get("FAASRM_TRAINER_TOKEN", "")
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    if not token:
        raise ValueError("a token is needed: --token-file, --token or $FAASRM_TRAINER_TOKEN")
    out = publish(args.url, token, args.onnx, checkpoint=args.checkpoint, ca_file=args.ca_file)
    print(json.dumps(out))
    return 0


def _testbed_up(args: argparse.Namespace) -> int:
    from training.testbed import main as testbed_main

    return testbed_main(args)


def _bench_real(args: argparse.Namespace) -> int:
    from training.invoker.real import main as real_main

    return real_main(args)


def _bench_curves(args: argparse.Namespace) -> int:
    from training.invoker.curves import main as curves_main

    return curves_main(args)


def _bench_bound(args: argparse.Namespace) -> int:
    from training.invoker.bound import main as bound_main

    return bound_main(args)


def _bench_agreement(args: argparse.Namespace) -> int:
    from training.invoker.agreement import main as agreement_main

    return agreement_main(args)


def _demo(args: argparse.Namespace) -> int:
    from training.invoker.real import main as real_main

    return real_main(args, demo=True)


def _bench_trainer(args: argparse.Namespace) -> int:
    from training.bench_trainer import main as bench_main

    return bench_main(args)


def _bench_faults(args: argparse.Namespace) -> int:
    from training.faults import main as faults_main

    return faults_main(args)


def _real_arguments(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    """Flags of `bench real` and `demo` (training/invoker/real.py; docs/invoker.md)."""
    p.add_argument(
        "--managers",
        default="fixed,learned" if demo else "fixed,rule,learned",
        help="comma-separated: fixed (no sidecar: the reference, always included), greedy, "
        "ensure, vpa (applied by the invoker), rule, smallest (a sidecar without a model: the "
        "allowed candidate closest to the user's size / the smallest allowed one), learned "
        "(sidecar + shipped model); a sidecar manager may carry a label, smallest@tight, to run "
        "again side by side with the settings given as --sidecar-set tight:SECTION.KEY=VALUE",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1 if demo else 2,
        help="rounds: every manager replays the slice once per round, the order reversed every "
        "other round and rotated every two (a steady drift hits every manager alike); with 2 "
        "or more, Fixed's later rounds against its earlier ones give the "
        "noise row",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=1.0 if demo else 2.0,
        help="real minutes of trace per manager",
    )
    p.add_argument(
        "--speedup",
        type=float,
        default=15.0,
        help="trace minutes replayed per real minute (the sample is sparse)",
    )
    p.add_argument("--seed", type=int, default=0, help="arrival placement and input sizes")
    p.add_argument(
        "--memory-mb",
        type=float,
        help="the invoker's memory for running calls: a call waits, first come first served, "
        "until its allocation's memory is free (as a container pool with a memory limit); "
        "default: no limit",
    )
    p.add_argument(
        "--sidecar-set",
        action="append",
        default=[],
        metavar="[LABEL:]SECTION.KEY=VALUE",
        help="a setting for every sidecar manager, or with LABEL: for the managers labelled so "
        "(repeatable; as 'faasrm sidecar run --set'), e.g. actuation.v1_memory_harvest=soft",
    )
    p.add_argument(
        "--cores-per-mb",
        type=float,
        default=1.0 / 256.0,
        help="user CPU per MB of user memory (default 1 core per 256 MB)",
    )
    p.add_argument(
        "--model",
        help="ONNX policy for 'learned' (default models/invoker.onnx, "
        "trained for 2-core hosts; every manager uses its grid)",
    )
    p.add_argument(
        "--json",
        default="out/demo_real.json" if demo else None,
        help="write figures (and config, per-function medians) as JSON",
    )
    p.add_argument(
        "--plots",
        default="out/" if demo else None,
        help="folder for PNG plots: RFET CDF, allocations over time",
    )
    p.add_argument("--records", action="store_true", help="also write every invocation's record")
    p.add_argument(
        "--runtime",
        choices=("cgroup", "docker"),
        default="cgroup",
        help="containers: bare cgroups (v1 or v2) or real Docker containers (a "
        "private dockerd is started, and docker.io apt-get installed, if none "
        "answers)",
    )


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
        help="comma-separated: fixed, greedy, ensure, vpa, oracle, oracle_in_box (the Oracle "
        "clipped into the safeguard's box), learned, rule, smallest",
    )
    ev.add_argument("--seed", type=int, default=1, help="workload seed (trace and every draw)")
    ev.add_argument(
        "--seeds",
        help="several workload seeds, e.g. 101,102,103: figures pooled over them with 95%% "
        "intervals (bootstrap over seeds and invocations), each seed's own figures in per_seed",
    )
    ev.add_argument("--trace", help="a folder of Azure Functions 2019 trace files to replay")
    ev.add_argument("--model", help="ONNX policy for the 'learned' manager (default: models/)")
    ev.add_argument("--json", help="write the figures as JSON to this path")
    ev.add_argument(
        "--plots",
        help="write RFET and execution-time CDF plots and the front of mean RFET against "
        "alloc_mem_ratio (with intervals under --seeds) as PNG files to this folder",
    )
    ev.set_defaults(func=_sim_eval)
    cap = sim.add_parser(
        "capacity",
        help="p98 response time per manager as the arrival rate grows; each manager's capacity",
    )
    cap.add_argument("--preset", default="paper", help="simulation preset (paper, small, sample)")
    cap.add_argument(
        "--managers",
        default="fixed,rule,smallest,oracle",
        help="comma-separated, as for sim eval (fixed, the reference, is always run)",
    )
    cap.add_argument("--seeds", default="101,102,103", help="workload seeds, pooled with intervals")
    cap.add_argument(
        "--loads",
        default="1.0,1.25,1.5,1.75,2.0",
        help="arrival-rate multiples (the same invocations, arriving that much faster); must "
        "include 1.0. capacity = the highest load whose p98 response time, and every lower "
        "load's, stays within 1.5x Fixed's at 1.0",
    )
    cap.add_argument("--model", help="ONNX policy for the 'learned' manager (default: models/)")
    cap.add_argument("--json", help="write the figures as JSON to this path")
    cap.set_defaults(func=_sim_capacity)
    for cmd in (ev, cap):
        cmd.add_argument(
            "--decline-when-queued",
            action="store_true",
            help="decide under safeguard.decline_when_queued (an acceleration may be declined "
            "while invocations wait for admission; off by default, as on a node)",
        )
        cmd.add_argument(
            "--mem-margin-units",
            type=float,
            help="decide under safeguard.mem_margin_units: memory's lower bound is the recent "
            "peak plus this many units (default: the preset's, a quarter as on a node; 1, the "
            "reference's box, under --v1-memory-harvest hard, as on a node)",
        )
        cmd.add_argument(
            "--mem-margin-sd",
            type=float,
            help="decide under safeguard.mem_margin_sd: memory's margin is at least this many "
            "standard deviations of the function's peaks (default: the preset's, 0, off)",
        )
        cmd.add_argument(
            "--mem-harvest-after",
            type=int,
            help="decide under safeguard.mem_harvest_after: memory is harvested only once a "
            "function has run this many invocations (default: the preset's, 0, as on a node)",
        )
        cmd.add_argument(
            "--restart-every",
            type=float,
            help="every node restarts each this many simulated seconds and forgets what it "
            "learned about each function, as a node without actuation.profiles_file does "
            "(default: never, as a node that keeps its profiles)",
        )
        cmd.add_argument(
            "--v1-memory-harvest",
            choices=("hard", "hold"),
            help="as the node's actuation.v1_memory_harvest: 'hard' OOM-kills a run that "
            "outgrows its harvested memory before a give-back, 'hold' makes it wait for the "
            "user's memory, charged a whole tick (default: the preset's 'hold', as on a node)",
        )

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

    sc = sub.add_parser("sidecar", help="the node daemon").add_subparsers(
        dest="sidecar_command", required=True
    )
    run = sc.add_parser("run", help="run the sidecar daemon (foreground; JSON logs on stderr)")
    run.add_argument("--config", help="TOML config file (default: built-in defaults)")
    run.add_argument("--host", help="listen address (server.host)")
    run.add_argument("--port", type=int, help="listen port (server.port)")
    run.add_argument("--model", help="ONNX policy (model.path)")
    run.add_argument("--state-file", help="crash-safety state file (actuation.state_file)")
    run.add_argument("--spool-dir", help="trajectory spool directory (spool.dir)")
    run.add_argument("--log-level", help="debug, info, warning or error")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set sampler.tick_s=0.05 (repeatable)",
    )
    run.set_defaults(func=_sidecar_run)
    rs = sc.add_parser(
        "restore",
        help="put every container the state file lists back at its user's limits (what a "
        "start-up does first; the unit runs it after the daemon exits)",
    )
    rs.add_argument("--config", help="TOML config file (default: built-in defaults)")
    rs.add_argument("--state-file", help="crash-safety state file (actuation.state_file)")
    rs.add_argument("--set", action="append", metavar="KEY=VALUE", help="as for run")
    rs.set_defaults(func=_sidecar_restore)

    tr = sub.add_parser(
        "train",
        help="offline PPO on the simulator (faasrm train --help lists every hyper-parameter)",
        add_help=False,
    )
    tr.add_argument("ppo_args", nargs=argparse.REMAINDER)
    tr.set_defaults(func=_train)

    ex = sub.add_parser("export", help="a training checkpoint -> one self-contained ONNX policy")
    ex.add_argument("checkpoint", help="checkpoint.pt written by faasrm train")
    ex.add_argument("out", help="the .onnx file to write (metadata goes to OUT.json beside it)")
    ex.set_defaults(func=_export)

    tr_s = sub.add_parser("trainer", help="the cluster's trainer service").add_subparsers(
        dest="trainer_command", required=True
    )
    ts = tr_s.add_parser("serve", help="run the trainer service (foreground; JSON logs on stderr)")
    ts.add_argument("--config", help="TOML config file (see training/trainer.example.toml)")
    ts.add_argument("--port", type=int, help="listen port (port)")
    ts.add_argument("--data-dir", help="trajectory store and model registry (data_dir)")
    ts.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set learner.interval_s=10 (repeatable)",
    )
    ts.set_defaults(func=_trainer_serve)
    tp = tr_s.add_parser("publish", help="publish an exported ONNX policy to the registry")
    tp.add_argument("onnx", help="the .onnx written by faasrm export (its .json is sent too)")
    tp.add_argument("--url", required=True, help="trainer base URL, e.g. https://trainer:9480")
    tp.add_argument("--ca-file", default="", help="CA (PEM) of the trainer's https certificate")
    tp.add_argument("--checkpoint", help="the training checkpoint, so online updates continue it")
    tp.add_argument("--token-file", help="file holding the bearer token")
    tp.add_argument("--token", help="the bearer token (else $FAASRM_TRAINER_TOKEN)")
    tp.set_defaults(func=_trainer_publish)

    tb = sub.add_parser(
        "testbed", help="a trainer and N sidecars with real workers on this machine"
    ).add_subparsers(dest="testbed_command", required=True)
    cu = tb.add_parser("up", help="one trainer + N sidecars on 127.0.0.1, real cgroups and workers")
    cu.add_argument("--nodes", type=int, default=10)
    cu.add_argument("--workers", type=int, default=2, help="worker processes (containers) per node")
    cu.add_argument("--duration", type=float, default=0.0, help="seconds to run (0: until Ctrl-C)")
    cu.add_argument("--dir", help="working directory (default: a new temporary one)")
    cu.add_argument("--rate", type=float, default=2.0, help="invocations per second per worker")
    cu.set_defaults(func=_testbed_up)

    bench = sub.add_parser("bench", help="benchmarks that print figures").add_subparsers(
        dest="bench_command", required=True
    )
    bs = bench.add_parser("sim", help="simulator decisions per second with an MLP policy")
    bs.add_argument("--preset", default="paper")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--decisions", type=int, default=100_000)
    bs.add_argument("--envs", type=int, default=16, help="environments stepped in lockstep")
    bs.add_argument("--model", help="ONNX policy in the loop (default: models/default.onnx)")
    bs.add_argument("--json", help="write the figures as JSON to this path")
    bs.set_defaults(func=_bench_sim)
    bsc = bench.add_parser(
        "sidecar", help="sidecar tick CPU, decision and actuation latency (real cgroups)"
    )
    bsc.add_argument("--decisions", type=int, default=5000)
    bsc.add_argument("--actuations", type=int, default=1000)
    bsc.add_argument("--ticks", type=int, default=200, help="real 100 ms ticks per mix")
    bsc.add_argument(
        "--model", help="ONNX policy to time (default: models/default.onnx, else a random MLP)"
    )
    bsc.add_argument("--json", help="write the figures as JSON to this path")
    bsc.set_defaults(func=_bench_sidecar)
    bt = bench.add_parser(
        "trainer", help="trainer ingest throughput and model propagation to every node"
    )
    bt.add_argument("--nodes", type=int, default=10, help="sidecars for the propagation figure")
    bt.add_argument("--batches", type=int, default=60, help="ingest batches to post")
    bt.add_argument("--batch-records", type=int, default=1000)
    bt.add_argument("--flood-batches", type=int, default=8, help="maximum-size batches posted")
    bt.add_argument("--flood-records", type=int, default=15_000, help="records per flood batch")
    bt.add_argument("--json", help="write the figures as JSON to this path")
    bt.set_defaults(func=_bench_trainer)
    bf = bench.add_parser(
        "faults",
        help="issue 15's faults end to end on a one-machine testbed (root, cgroup v1)",
        description="Kills a sidecar mid-invocation, stops and kills the trainer, posts "
        "malformed hooks and trajectories, publishes bad models and one that fails at run "
        "time, then restarts; prints what it found against the targets (docs/faults.md). "
        "Exit code 1 when a target is missed.",
    )
    bf.add_argument("--kill-tries", type=int, default=5, help="SIGKILLs of a sidecar")
    bf.add_argument("--outage-s", type=float, default=20.0, help="seconds the trainer is down")
    bf.add_argument("--hook-posts", type=int, default=300, help="malformed hook posts")
    bf.add_argument(
        "--trajectory-posts", type=int, default=300, help="malformed trajectory batches"
    )
    bf.add_argument("--seed", type=int, default=0, help="drivers, bodies and random models")
    bf.add_argument("--json", help="write the figures and each scenario's detail as JSON")
    bf.set_defaults(func=_bench_faults)
    br = bench.add_parser(
        "real", help="real functions on a local invoker (real cgroups): managers in turn, RFET"
    )
    _real_arguments(br)
    br.set_defaults(func=_bench_real)
    bcu = bench.add_parser(
        "curves", help="real functions' time vs CPU quota / memory limit, fitted to the sim model"
    )
    bcu.add_argument("--functions", help="comma-separated subset (default: all)")
    bcu.add_argument("--repeats", type=int, default=3, help="runs per point (median)")
    bcu.add_argument(
        "--periods",
        help="comma-separated CFS periods in ms (e.g. 50,100,200,1000): instead of the curves, "
        "the time at every period x quota (default function: matmul)",
    )
    bcu.add_argument("--quotas", help="with --periods: comma-separated cores (0.25,0.5,1)")
    bcu.add_argument("--sizes", help="with --periods: inputs, e.g. matmul=400 (default: curves')")
    bcu.add_argument("--json", help="write the curves and fits as JSON to this path")
    bcu.set_defaults(func=_bench_curves)
    bbd = bench.add_parser(
        "bound",
        help="the least RFET and p98 execution time any allocation gives a real run's calls",
        description="Each function's fastest CPU quota up to the host's cores in a 'faasrm bench "
        "curves --json' output, over its time at the user's size, applied to each call of a "
        "'faasrm bench real --records --json' run at its reference (the geometric mean of "
        "Fixed's rounds): the geometric-mean RFET by duration class and the p98 execution time "
        "no manager can beat there (docs/invoker.md).",
    )
    bbd.add_argument("--real", required=True, help="a 'faasrm bench real --records --json' output")
    bbd.add_argument("--curves", required=True, help="a 'faasrm bench curves --json' output")
    bbd.add_argument(
        "--host-cores", type=float, help="the cores a call may get (default: this host's)"
    )
    bbd.add_argument("--json", help="write the bound as JSON to this path")
    bbd.set_defaults(func=_bench_bound)
    bag = bench.add_parser(
        "agreement",
        help="the simulator against a real run: same slice, functions and managers, side by side",
        description="Replays a real run's trace slice in the simulator, with each real "
        "function's duration and working set fitted from bench curves, and prints per manager "
        "the simulated and real geometric-mean RFET, share above 1.2, harvested and "
        "accelerated shares and their differences (docs/agreement.md). Without --real it runs "
        "bench real first (one round by default, to keep it short: a --repeats 2 run of "
        "'faasrm bench real --records --json PATH' passed as --real is the better input); "
        "without --curves it runs bench curves (about a minute). Needs root for either.",
    )
    bag.add_argument(
        "--real",
        help="a 'faasrm bench real --records --json' output: its slice, grid, model and "
        "records (default: run bench real now)",
    )
    bag.add_argument(
        "--curves", help="a 'faasrm bench curves --json' output (default: run bench curves now)"
    )
    bag.add_argument(
        "--managers",
        help="comma-separated managers to simulate (and, without --real, to run for real); "
        "default: the real run's, or fixed,rule,smallest,learned",
    )
    bag.add_argument("--minutes", type=float, default=2.0, help="without --real: minutes a manager")
    bag.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="without --real: rounds of bench real (1 keeps it short; 2 gives the noise row "
        "and intervals that cover run-to-run noise)",
    )
    bag.add_argument("--seed", type=int, default=0, help="without --real: the slice's seed")
    bag.add_argument(
        "--speedup", type=float, default=15.0, help="without --real: trace minutes a minute"
    )
    bag.add_argument(
        "--cores-per-mb",
        type=float,
        default=1.0 / 256.0,
        help="without --real: user CPU per MB of user memory",
    )
    bag.add_argument(
        "--model", help="ONNX policy for 'learned' (default: the real run's, models/invoker.onnx)"
    )
    bag.add_argument(
        "--json",
        help="write the report here; a real run or curves measured by this command go beside "
        "it (PATH without .json + .real.json / .curves.json)",
    )
    bag.set_defaults(func=_bench_agreement)
    dm = sub.add_parser(
        "demo", help="local invoker + real functions under Fixed, then the sidecar's learned policy"
    )
    _real_arguments(dm, demo=True)
    dm.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `faasrm train` hands every flag (--help included) to the trainer's own typed parser.
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        args.ppo_args = extra + args.ppo_args
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        print(f"faasrm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
