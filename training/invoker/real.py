"""``faasrm bench real`` and ``faasrm demo``: real functions on a local invoker, managers in turn.

Every manager replays the same trace slice (``invoker.schedule``: the bundled Azure sample,
``speedup`` trace minutes per real minute, inputs drawn from ``seed``) over fresh containers
(cgroups ``faasrm-real-<pid>-<manager>-r<round>/<function>``, one worker each), in ``repeats``
rounds; within a round the managers run one after another, in an order reversed every other
round (``training.evidence.round_order``), so a drift of the host hits every manager alike:

* ``fixed``: no sidecar, every container stays at its user's size (the reference);
* ``greedy``, ``ensure``, ``vpa``: no sidecar; the invoker applies the rule itself (the
  simulator's rules, ``training.baselines.BASELINE_RULES``) before each invocation from what it
  measured of the function's previous invocations, and restores the user's size after it (ENSURE's
  baseline is the function's mean time under ``fixed`` so far);
* ``rule``, ``smallest``: a real ``faasrm sidecar run`` without a model, deciding with its
  model-free rule (``[model] rule``: the allowed candidate closest to the user's size, or the
  smallest allowed one) behind the safeguard;
* ``learned``: the sidecar with the shipped model, called through its hook API at every
  invocation's start and end;
* a labelled sidecar manager, ``smallest@tight``: the same manager run again in every round, side
  by side, with the settings ``--sidecar-set tight:SECTION.KEY=VALUE`` gives it (the only way to
  compare two settings with paired intervals: separate runs share no rounds).

Every manager works on one grid: the model's (from its metadata; the daemon refuses a model
trained on another), by default ``models/invoker.onnx``'s 0.25 core x 8, 64 MB x 8, trained on
the simulator's ``invoker`` preset (2-core hosts like this one). ``faasrm demo`` (one round) also
starts a trainer service: the sidecar ships its trajectories to it, as on a real cluster.

The figures (``training.evidence.real_report``): an invocation's reference time is the geometric
mean of its executions under ``fixed``; RFET = execution time / reference; the ``noise`` row is
Fixed's later rounds against its earlier ones (needs ``repeats`` >= 2); every figure has a 95%
paired-bootstrap interval and a verdict, by duration class and by function. Failed and
OOM-killed invocations are counted in ``failures`` / ``oom_kills`` and left out of RFET.
Every container gets one unrecorded warm-up invocation before the replay (and before the
sidecar starts, so the sidecar still sees the first recorded invocation as a function's first).
Everything started is stopped and every cgroup removed at the end, on errors and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sidecar.config import from_dict as config_from_dict
from sidecar.config import parse_override
from sidecar.core.grid import ResourceGrid
from sidecar.dockerd import DockerEngine
from sidecar.models import model_grid
from training import evidence
from training.baselines import BASELINE_RULES
from training.invoker.functions import SPECS
from training.invoker.invoker import (
    Containers,
    Invoker,
    Measurement,
    record_dicts,
    schedule,
)
from training.processes import SidecarProcess, TrainerProcess, free_port

SIDECAR_RULES = {"rule": "user", "smallest": "smallest"}
"""Managers that are a model-less sidecar, and the ``[model] rule`` each runs."""
MANAGERS = ("fixed", *BASELINE_RULES, *SIDECAR_RULES, "learned")
LABEL = re.compile(r"[a-z0-9_-]{1,32}")
"""A sidecar manager's label, ``smallest@LABEL``: a name for one set of settings."""
REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "invoker.onnx"
INVOKER_GRID = ResourceGrid(cpu_unit_cores=0.25, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
"""The grid without a model (rule fallback, local managers): a quarter core suits 2 cores."""
PARENT_PREFIX = "faasrm-real-"
SETTLE_S = 3.0
"""Pause between start-up (workers, warm-ups, sidecar) and the replay: without it the first
burst of invocations ran slower in whichever run had the busier start (2-5x for Fixed's first
seven invocations in one run), which showed up as a gain for the sidecar runs."""


def base_manager(manager: str) -> str:
    """``smallest@tight`` -> ``smallest``."""
    return manager.partition("@")[0]


Settings = dict[str, dict[str, Any]]
"""Sidecar config, section by section."""


def parse_managers(text: str, sets: list[str]) -> tuple[list[str], dict[str, Settings]]:
    """``--managers`` and the ``--sidecar-set`` flags -> (managers, Fixed first; each sidecar
    manager's settings). A setting without a label goes to every sidecar manager, one with
    ``LABEL:`` to the managers labelled so, after the others."""
    managers = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    sidecars = (*SIDECAR_RULES, "learned")
    for m in managers:
        base, at, label = m.partition("@")
        if base not in MANAGERS:
            raise ValueError(f"unknown manager {m!r}: choose from {', '.join(MANAGERS)}")
        if at and (base not in sidecars or not LABEL.fullmatch(label)):
            raise ValueError(
                f"manager {m!r}: only a sidecar manager ({', '.join(sidecars)}) takes a label, "
                "of 1-32 characters a-z, 0-9, _ or -, e.g. smallest@tight"
            )
    managers = ["fixed", *(m for m in managers if m != "fixed")]
    labels = {m.partition("@")[2] for m in managers if "@" in m}
    common: Settings = {}
    labelled: dict[str, Settings] = {}
    for text in sets:
        key, value = parse_override(text)
        label, colon, key = key.rpartition(":")
        if colon and label not in labels:
            raise ValueError(
                f"--sidecar-set {text!r}: no manager is labelled {label!r} (e.g. smallest@{label})"
            )
        sec, _, name = key.partition(".")
        if not name:
            raise ValueError(f"--sidecar-set {text!r}: expected [LABEL:]SECTION.KEY=VALUE")
        (labelled.setdefault(label, {}) if colon else common).setdefault(sec, {})[name] = value
    settings = {}
    for m in managers:
        if base_manager(m) in sidecars:
            own = labelled.get(m.partition("@")[2], {})
            settings[m] = {s: {**common.get(s, {}), **own.get(s, {})} for s in {*common, *own}}
    return managers, settings


def sidecar_box(settings: Settings) -> dict[str, Any]:
    """The safeguard and memory mode a sidecar given ``settings`` decides under, defaults
    included, as the node reads its config. Kept with a run, so that simulating it later (bench
    agreement) does not take a later default."""
    cfg = config_from_dict(settings)
    return {
        "safeguard": dataclasses.asdict(cfg.safeguard),
        "v1_memory_harvest": cfg.actuation.v1_memory_harvest,
    }


def sidecar_process(
    parent: str,
    workdir: Path,
    model: Path | None,
    grid: ResourceGrid,
    trainer: TrainerProcess | None = None,
    docker: DockerEngine | None = None,
    rule: str = "user",
    settings: Settings | None = None,
) -> SidecarProcess:
    """A sidecar managing every child cgroup of ``parent`` (with ``docker``: the invoker's Docker
    containers on that engine) on ``grid``; without ``model``, the model-free ``rule``;
    ``settings``: more config, section by section (``bench real --sidecar-set``)."""
    containers: dict[str, dict[str, Any]] = (
        {"cgroupfs": {"parent": parent}}
        if docker is None
        else {"docker": {"enabled": True, "base_url": docker.base_url or ""}}
    )
    shipper = (
        {}
        if trainer is None
        else {"shipper": trainer.shipper(workdir / "shipper.json", interval_s=0.5)}
    )
    sections: dict[str, dict[str, Any]] = {
        "grid": dataclasses.asdict(grid),  # the model's (the daemon refuses another)
        **containers,
        "model": {"path": str(model or "/nonexistent/rule-fallback.onnx"), "rule": rule},
        **shipper,
    }
    for sec, kv in (settings or {}).items():
        sections[sec] = {**sections.get(sec, {}), **kv}
    return SidecarProcess(
        workdir,
        sections,
        log_level="warning",
        invoker_child=True,
    )


def _per_function(
    records: list[Measurement], reduce: Callable[[list[float]], Any]
) -> dict[str, float]:
    """``reduce`` of each function's successful execution times."""
    by: dict[str, list[float]] = {}
    for r in records:
        if r.outcome == "success":
            by.setdefault(r.function, []).append(r.exec_s)
    return {f: float(reduce(v)) for f, v in by.items()}


def means(records: list[Measurement]) -> dict[str, float]:
    return _per_function(records, np.mean)


def medians(records: list[Measurement]) -> dict[str, float]:
    return _per_function(records, np.median)


async def run_manager(
    manager: str,
    invocations,
    *,
    ratio: float,
    model: Path | None,
    grid: ResourceGrid,
    workdir: Path,
    state: dict,
    echo=print,
    trainer: TrainerProcess | None = None,
    baselines: dict[str, float] | None = None,
    engine: DockerEngine | None = None,
    round_index: int = 0,
    settings: Settings | None = None,
    memory_mb: float | None = None,
) -> tuple[list[Measurement], int, int]:
    """Replay ``invocations`` under ``manager``; (records, OOM kills, give-backs).

    ``baselines``: each function's mean execution time under ``fixed`` (ENSURE's baseline);
    ``settings``: the sidecar's config beyond the defaults; ``memory_mb``: the invoker's memory
    pool (``invoker.MemoryPool``), None for none."""
    base = base_manager(manager)
    run = f"{manager.replace('@', '-')}-r{round_index}"
    parent = f"{PARENT_PREFIX}{os.getpid()}-{run}"
    containers = Containers(parent, SPECS, ratio, engine=engine)
    sidecar = None
    state.update(manager=manager, containers=containers, sidecar=None, invoker=None)
    try:
        await containers.start()
        rule = None
        if base in BASELINE_RULES:
            rule = BASELINE_RULES[base](grid)
        elif base != "fixed":
            sidecar = sidecar_process(
                parent,
                workdir / run,
                model if base == "learned" else None,
                grid,
                trainer,
                docker=engine,
                rule=SIDECAR_RULES.get(base, "user"),
                settings=settings,
            )
            ready = await asyncio.to_thread(sidecar.start)
            state.update(sidecar=sidecar, ready=ready)
            echo(
                f"{manager}: sidecar {ready.get('model_source', '?')} policy "
                f"{ready.get('model', '')}; while it runs:"
            )
            echo(f"  {sidecar.url}/debug/ (allocations: /debug/allocations)")
        await asyncio.sleep(SETTLE_S)  # the same quiet start for every manager
        invoker = Invoker(
            containers,
            sidecar.socket if sidecar else None,
            rule=rule,
            baselines=baselines,
            memory_mb=memory_mb,
        )
        state["invoker"] = invoker
        records = await invoker.replay(invocations)
        ooms = sum(c.oom_kills() for c in containers.values())
        give_backs = sum(r.give_backs for r in records)
        if sidecar is not None:
            give_backs = max(give_backs, int(sidecar.metric("faasrm_give_backs_total")))
            if trainer is not None:
                await asyncio.to_thread(sidecar.drain)
        return records, ooms, give_backs
    finally:
        state.update(sidecar=None)  # the invoker's progress stays for the final frame
        if sidecar is not None:
            await asyncio.to_thread(sidecar.stop)
        await containers.stop()


def _live_view(state: dict, started: float):
    """The demo's live block: progress, where to look while a sidecar runs, and each container's
    user size beside the limits it has now (the last ones read once it is stopped, so the final
    frame is not a column of dashes). Lines stay under 80 columns: a URL is never wrapped."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    inv, containers, sc = state.get("invoker"), state.get("containers"), state.get("sidecar")
    p = inv.progress if inv else None
    head = Text(
        f"[{time.monotonic() - started:5.0f} s] manager {state.get('manager', '-')}: "
        + (
            f"{p.done}/{p.total} invocations, {p.running} running, {p.failures} failed"
            if p
            else "starting containers"
        )
    )
    parts: list = [head]
    if sc is not None:
        parts.append(Text(f"sidecar page:  {sc.url}/debug/"))
        parts.append(Text(f"allocations:   {sc.url}/debug/allocations"))
    if state.get("trainer") is not None:
        parts.append(
            Text(
                f"trainer {state['trainer'].url}: "
                f"{state.get('trainer_records', 0)} trajectory records received"
            )
        )
    if containers:
        seen = state.setdefault("limits_seen", {})
        t = Table("container", "user cpu", "user MB", "cpu limit", "MB limit", "waiting", box=None)
        for c in containers.values():
            lim = c.limits()
            if lim is not None:
                seen[c] = lim
            lim = seen.get(c)
            q = None if lim is None else lim.cpu_quota_cores
            cpu = "-" if lim is None else "none" if q is None else f"{q:.2f}"
            mem = (
                "-"
                if lim is None
                else "none"
                if lim.mem_limit_bytes is None
                else f"{lim.mem_limit_bytes / 2**20:.0f}"
            )
            t.add_row(c.name, f"{c.user_cpu:.2f}", f"{c.user_mem_mb:.0f}", cpu, mem, str(c.waiting))
        parts.append(t)
    return Group(*parts)


def grid_text(grid: ResourceGrid) -> str:
    return (
        f"{grid.cpu_unit_cores:g} core x {grid.cpu_units}, "
        f"{grid.mem_unit_mb:g} MB x {grid.mem_units}"
    )


def replays(records: list[list[Measurement]], n: int, oom_kills: int) -> evidence.Replays:
    """One manager's rounds of measurements as (round x invocation) arrays for the figures."""
    shape = (len(records), n)
    exec_s, resp = np.full(shape, np.nan), np.full(shape, np.nan)
    core_s, mb_s = np.full(shape, np.nan), np.full(shape, np.nan)
    failed = np.ones(shape, bool)  # an invocation the replay lost counts as failed
    for r, rs in enumerate(records):
        for m in rs:
            exec_s[r, m.idx], resp[r, m.idx] = m.exec_s, m.response_s
            core_s[r, m.idx], mb_s[r, m.idx] = held(m)
            failed[r, m.idx] = m.outcome != "success"
    return evidence.Replays(exec_s, resp, core_s, mb_s, failed, oom_kills)


def held(m: Measurement) -> tuple[float, float]:
    """(core-seconds, MB-seconds) a call held: what the sidecar's end hook reported (give-backs
    included), else its allocation throughout (Fixed, the invoker's own rules, a call the sidecar
    never started: nothing changes a container's limits mid-run)."""
    if m.held_core_s is None or m.held_mb_s is None:
        return m.cpu_cores * m.exec_s, m.mem_mb * m.exec_s
    return m.held_core_s, m.held_mb_s


def choice_shares(records: list[Measurement]) -> dict[str, float] | None:
    """Where a sidecar's choices fell in the safeguard's box, over the decisions that had more
    than one candidate: the share at its smallest corner (what ``smallest`` picks) and at the
    candidate closest to the user's size (what ``rule`` picks; the box makes that a clamp per
    resource). The real-host twin of the simulator's ``Choices``; None without sidecar records."""
    n = smallest = user = 0
    for x in records:
        if x.units is None or x.allowed is None or x.user_units is None:
            continue
        c_lo, c_hi, m_lo, m_hi = x.allowed
        if c_lo == c_hi and m_lo == m_hi:
            continue
        n += 1
        smallest += x.units == (c_lo, m_lo)
        closest = (min(max(x.user_units[0], c_lo), c_hi), min(max(x.user_units[1], m_lo), m_hi))
        user += x.units == closest
    if n == 0:
        return None
    return {"decisions": n, "at_smallest": smallest / n, "at_user_closest": user / n}


def report(
    measured: dict[str, list[list[Measurement]]],
    oom_kills: dict[str, int],
    give_backs: dict[str, int],
    invocations: list,
) -> dict[str, Any]:
    """The evidence report of every manager's rounds, plus what only the invoker counted."""
    n = len(invocations)
    out = evidence.real_report(
        {m: replays(rs, n, oom_kills[m]) for m, rs in measured.items()},
        [a.container for a in invocations],
    )
    for m, row in out["results"].items():
        flat = [x for rs in measured[m] for x in rs]
        total = max(1, len(flat))
        row["harvested_frac"] = sum(x.kind == "harvested" for x in flat) / total
        row["accelerated_frac"] = sum(x.kind == "accelerated" for x in flat) / total
        row["give_backs"] = give_backs[m]
        if (choices := choice_shares(flat)) is not None:
            row["choices"] = choices
    ref = evidence.reference_times(replays(measured["fixed"], n, 0))
    classes = [evidence.duration_class(x) for x in ref if np.isfinite(x)]
    out["workload"] = {
        "invocations": n,
        "by_duration": {c: classes.count(c) for c in evidence.DURATION_CLASSES},
        "ge_0.1s_frac": float(np.mean([c != "lt_0.1s" for c in classes])) if classes else 0.0,
    }
    return out


async def run_all(
    managers: list[str],
    minutes: float,
    *,
    speedup: float,
    seed: int,
    ratio: float,
    model: Path | None,
    grid: ResourceGrid,
    live: bool,
    workdir: Path,
    repeats: int = 1,
    with_trainer: bool = False,
    echo=print,
    engine: DockerEngine | None = None,
    settings: dict[str, Settings] | None = None,
    memory_mb: float | None = None,
) -> dict[str, Any]:
    """``repeats`` rounds of every manager over the same invocations (``round_order``);
    ``with_trainer``: a local trainer service receives the sidecar's trajectories (its learner
    runs with its defaults); ``settings``: each sidecar manager's config beyond the defaults;
    ``memory_mb``: the invoker's memory pool for running calls (None: none)."""
    settings = settings or {}
    boxes = {}
    for m, kv in settings.items():  # a setting no sidecar can take fails here, before any run
        try:
            boxes[m] = sidecar_box(kv)
        except ValueError as exc:
            raise ValueError(f"--sidecar-set for {m}: {exc}") from None
    invocations = schedule(minutes, speedup, seed)
    # short lines: a terminal of 80 columns must not cut a word (nor a URL, below)
    echo(f"trace: bundled Azure sample, {speedup:g} trace minutes per minute, seed {seed}")
    echo(f"  {minutes:g} min per manager: {len(invocations)} invocations on {len(SPECS)} functions")
    echo(f"  grid: {grid_text(grid)}; {repeats} round(s), order reversed every other round")
    if memory_mb is not None:
        echo(f"  memory pool: {memory_mb:g} MB for running calls, first come, first served")
    measured: dict[str, list[list[Measurement]]] = {m: [] for m in managers}
    oom_kills = dict.fromkeys(managers, 0)
    give_backs = dict.fromkeys(managers, 0)
    state: dict = {}
    started = time.monotonic()
    live_ctx = None
    if live:
        from rich.live import Live

        live_ctx = Live(_live_view(state, started), refresh_per_second=2, transient=False)
    say = live_ctx.console.print if live_ctx else echo
    refresher = poller = trainer = None
    try:
        if with_trainer:
            (workdir / "trainer").mkdir(parents=True, exist_ok=True)
            learner = importlib.util.find_spec("torch") is not None  # else: receive only
            trainer = TrainerProcess(
                workdir / "trainer",
                free_port(),
                {
                    "learner.enabled": learner,
                    **{f"grid.{k}": v for k, v in dataclasses.asdict(grid).items()},
                },
            )
            await asyncio.to_thread(trainer.start)
            state["trainer"] = trainer
            echo(f"trainer service: {trainer.url}")
            echo(f"  trajectories in {workdir / 'trainer'}")

            async def poll_trainer() -> None:
                while True:
                    state["trainer_records"] = await asyncio.to_thread(trainer.records, 2.0)
                    await asyncio.sleep(1.0)

            poller = asyncio.create_task(poll_trainer())
        if live_ctx is not None:
            live_ctx.start()

            async def refresh() -> None:
                while True:
                    live_ctx.update(_live_view(state, started))
                    await asyncio.sleep(0.5)

            refresher = asyncio.create_task(refresh())
        for r in range(repeats):
            for m in evidence.round_order(managers, r):
                base = base_manager(m)
                extra = f", with {settings[m]}" if settings.get(m) else ""
                if base in BASELINE_RULES:
                    say(f"{m}: applied by the invoker (no sidecar), grid {grid_text(grid)}")
                elif base in SIDECAR_RULES:
                    say(f"{m}: sidecar without a model, rule '{SIDECAR_RULES[base]}'{extra}")
                elif base == "learned":
                    say(f"{m}: sidecar with {model}{extra}")
                records, ooms, gbs = await run_manager(
                    m,
                    invocations,
                    ratio=ratio,
                    model=model,
                    grid=grid,
                    workdir=workdir,
                    state=state,
                    echo=say,
                    baselines=means([x for rs in measured["fixed"] for x in rs]),
                    trainer=trainer,
                    engine=engine,
                    round_index=r,
                    settings=settings.get(m),
                    memory_mb=memory_mb,
                )
                measured[m].append(records)
                oom_kills[m] += ooms
                give_backs[m] += gbs
                if m == "learned" and state.get("ready"):
                    state["policy"] = state["ready"].get("model")
                failed = sum(x.outcome != "success" for x in records)
                say(f"{m} (round {r + 1}/{repeats}): {len(records)} invocations, {failed} failed")
        if trainer is not None:  # the sidecars have stopped: their shippers flushed or spooled
            state["trainer_records"] = await asyncio.to_thread(trainer.records, 2.0)
    finally:
        for task in (refresher, poller):
            if task is not None:
                task.cancel()
        if live_ctx is not None:
            live_ctx.stop()
        if trainer is not None:
            await asyncio.to_thread(trainer.stop)
    out = report(measured, oom_kills, give_backs, invocations)
    if "learned" in out["results"] and state.get("policy"):
        out["results"]["learned"]["policy"] = state["policy"]
    return {
        **out,
        "records": {m: [record_dicts(rs) for rs in rounds] for m, rounds in measured.items()},
        "medians_s": medians([x for rs in measured["fixed"] for x in rs]),
        "functions": {
            s.name: {
                "user_mem_mb": s.mem_mb,
                "user_cpu_cores": s.mem_mb * ratio,
                "input_range": [s.lo, s.hi],
                "shape": s.shape,
            }
            for s in SPECS
        },
        "config": {
            "minutes": minutes,
            "speedup": speedup,
            "seed": seed,
            "repeats": repeats,
            "order": [evidence.round_order(managers, r) for r in range(repeats)],
            "cores_per_mb": ratio,
            "model": str(model) if model else None,
            "grid": dataclasses.asdict(grid),
            "sidecar_settings": settings,
            "sidecar_boxes": boxes,
            "memory_mb": memory_mb,
            "resamples": evidence.RESAMPLES,
            "bootstrap_seed": evidence.SEED,
        },
        **(
            {"trainer": {"url": trainer.url, "records": state.get("trainer_records", -1)}}
            if trainer is not None
            else {}
        ),
    }


def _fmt_ci(point: float, ci: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(point)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def table(out: dict[str, Any]) -> str:
    """Every manager and the noise row: geometric-mean RFET with its interval and verdict, the
    share above 1.2 against the noise row, tails, resources; then the duration classes."""
    rows = ([("noise", out["noise"])] if out.get("noise") else []) + list(out["results"].items())
    head = [
        "manager", "gmean RFET [95%]", "verdict", ">1.2 [95%]", "vs noise", "p98 RFET",
        "p98 exec s", "p98 resp s", "resp vs fixed [95%]", "alloc CPU", "alloc MB", "fail",
        "OOM", "n",
        "later/earlier rounds",
    ]  # fmt: skip
    body = []
    for name, st in rows:
        ref = name == "fixed"  # measured against a reference it is part of: see the noise row
        body.append(
            [
                name,
                "-" if ref else _fmt_ci(st["gmean_rfet"], st["gmean_rfet_ci"]),
                "reference" if ref else st["verdict"] if name != "noise" else "-",
                "-"
                if ref
                else _fmt_ci(st["slowdown_frac_1_2"], st["slowdown_frac_1_2_ci"], "{:.1%}"),
                "-" if ref else st.get("slowdown_vs_noise", "-"),
                "-" if ref else f"{st['p98_rfet']:.2f}",
                f"{st['p98_duration_s']:.2f}",
                f"{st['p98_response_s']:.2f}",
                "-" if ref else _fmt_ci(st["response_ratio"], st["response_ratio_ci"]),
                f"{st['alloc_cpu_ratio']:.2f}",
                f"{st['alloc_mem_ratio']:.2f}",
                str(st["failures"]),
                str(st["oom_kills"]),
                str(st["invocations"]),
                "-"
                if "rounds_gmean_ratio" not in st or name == "noise"
                else _fmt_ci(st["rounds_gmean_ratio"], st["rounds_gmean_ratio_ci"])
                + ("" if st["rounds_agree"] else " DISAGREE"),
            ]
        )
    classes = ["manager"] + [f"{c} gmean [95%] (n)" for c in evidence.DURATION_CLASSES]
    short = {"faster": "faster", "slower": "SLOWER", "indistinguishable": "n.s."}
    by = []
    for name, st in rows:
        if name == "fixed":
            continue
        line = [name]
        for c in evidence.DURATION_CLASSES:
            b = st["by_duration"][c]
            line.append(
                "-"
                if not b["invocations"]
                else f"{_fmt_ci(b['gmean_rfet'], b['gmean_rfet_ci'])} "
                f"{short[b['verdict']] if name != 'noise' else ''} ({b['invocations']})"
            )
        by.append(line)
    w = out["workload"]
    picks = [
        f"{name} {c['at_smallest']:.0%} at the smallest allowed, {c['at_user_closest']:.0%} at "
        f"the allowed closest to the user's size ({c['decisions']})"
        for name, st in rows
        if (c := st.get("choices"))
    ]
    pairs = [
        f"{key} {_fmt_ci(p['gmean_rfet_ratio'], p['gmean_rfet_ratio_ci'])} {p['verdict']}"
        + ("" if p["rounds_agree"] else " (rounds disagree: not a finding)")
        for key, p in out.get("pairs", {}).items()
    ]
    pair_text = "\n\npairs (ratio of geometric-mean RFET): " + "; ".join(pairs) if pairs else ""
    choices = (
        "\n\nchoices (decisions with more than one allowed candidate): " + "; ".join(picks)
        if picks
        else ""
    )
    return (
        _grid_text([head, *body])
        + "\n\nby duration class of the reference execution time (n.s.: the interval holds 1):\n"
        + _grid_text([classes, *by])
        + f"\n\nworkload: {w['invocations']} invocations a round, "
        f"{w['ge_0.1s_frac']:.0%} of them 0.1 s or longer at the user's size" + pair_text + choices
    )


def _grid_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def trust_note(out: dict[str, Any]) -> str:
    """How far a result can be trusted: what its intervals cover and what they do not."""
    repeats = out["config"]["repeats"]
    if repeats >= 2 and out.get("noise"):
        n = out["noise"]
        return (
            f"{repeats} rounds. Intervals: 95% paired bootstrap over invocations. Noise row: "
            f"Fixed against its own earlier rounds put {n['slowdown_frac_1_2']:.1%} of "
            "invocations above RFET 1.2; a manager's share counts as harm only when it lies "
            "above that ('vs noise'). 'later/earlier rounds': each manager's rounds against "
            "each other; DISAGREE means the host or the manager changed between its runs, and "
            "its figures (and its pairs) are not a steady measurement."
        )
    return (
        "One round: the intervals cover only which invocations were drawn, not run-to-run "
        "noise (a single Fixed replay against another put 8-24% of invocations above RFET 1.2 "
        "on this kind of host). Treat small differences as noise; for figures to act on run "
        "faasrm bench real --managers fixed,rule,learned --repeats 2."
    )


def leftovers(engine: DockerEngine | None = None) -> list[str]:
    """faasrm-real-* cgroups (v1 or v2) and Docker containers of this process still present
    (should be none after a run)."""
    from sidecar.cgroups import v2_base

    prefix = f"{PARENT_PREFIX}{os.getpid()}-"
    dirs = [Path("/sys/fs/cgroup") / c for c in ("cpu", "cpuacct", "memory")]
    dirs += [Path(base)] if (base := v2_base("/sys/fs/cgroup")) else []
    out = [str(p) for d in dirs for p in d.glob(f"{prefix}*")]
    if engine is not None:
        from training.invoker.docker_container import leftovers as docker_leftovers

        out += docker_leftovers(engine, prefix)
    return out


def main(args: Any, *, demo: bool = False) -> int:
    from sidecar import cgroups, dockerd

    try:
        cgroups_ok = cgroups.detect_version() in (1, 2)
    except cgroups.CgroupError:
        cgroups_ok = False
    if os.geteuid() != 0 or not cgroups_ok:
        print(
            "faasrm: error: needs root and cgroup v1 (cpu, cpuacct, memory) or v2 (cpu, "
            "memory) controllers",
            file=sys.stderr,
        )
        return 2
    # Fixed is the reference; it runs first in the first round
    managers, settings = parse_managers(args.managers, args.sidecar_set)
    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if args.memory_mb is not None and not args.memory_mb > 0:
        raise ValueError("--memory-mb must be above 0")
    model = Path(args.model) if args.model else DEFAULT_MODEL
    learned = any(base_manager(m) == "learned" for m in managers)
    if learned and not model.is_file():
        raise FileNotFoundError(f"model {model} not found")
    grid = (model_grid(model) if learned else None) or INVOKER_GRID
    engine = None
    if args.runtime == "docker":  # explicitly asked for: installing docker.io is allowed
        try:
            engine = dockerd.find_or_start(
                install=True, echo=lambda m: print(f"--runtime docker: {m}", flush=True)
            )
        except dockerd.EngineUnavailable as exc:
            print(f"faasrm: error: --runtime docker: {exc}", file=sys.stderr)
            return 2
        print(
            f"--runtime docker: engine {engine.base_url or 'from DOCKER_HOST'}"
            f"{' (private, stopped at the end)' if engine.owned else ''}",
            flush=True,
        )

    async def _main() -> dict:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:  # once: a second Ctrl-C must not cut the cleanup short
            task.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: None)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        with tempfile.TemporaryDirectory(prefix="faasrm-real-") as tmp:
            return await run_all(
                managers,
                args.minutes,
                speedup=args.speedup,
                seed=args.seed,
                ratio=args.cores_per_mb,
                model=model,
                grid=grid,
                live=demo,
                workdir=Path(tmp),
                repeats=args.repeats,
                with_trainer=demo,
                echo=lambda m: print(m, flush=True),
                engine=engine,
                settings=settings,
                memory_mb=args.memory_mb,
            )

    try:
        out = asyncio.run(_main())
    except asyncio.CancelledError:
        print(
            "interrupted: containers, workers and the sidecar were stopped and removed",
            file=sys.stderr,
        )
        return 130
    finally:
        left = leftovers(engine)
        if left:
            print(f"faasrm: warning: cgroups or containers left behind: {left}", file=sys.stderr)
        if engine is not None:
            engine.stop()
    print()
    print(table(out))
    print()
    print(trust_note(out))
    if "trainer" in out:
        print(
            f"trainer service: received {out['trainer']['records']} trajectory records from "
            "the sidecars\n  (its learner starts updating at learner.min_records)"
        )
    if getattr(args, "plots", None):
        try:
            for path in plots(out, args.plots):
                print(f"wrote {path}")
        except ImportError as exc:
            print(f"faasrm: no plots ({exc}): pip install 'faasrm[sim]'", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = (
            out
            if getattr(args, "records", False)
            else {k: v for k, v in out.items() if k != "records"}
        )
        Path(args.json).write_text(json.dumps(payload, indent=1, sort_keys=True))
        print(f"wrote {args.json}")
    return 0


def plots(out: dict, folder: str | Path) -> list[Path]:
    """RFET CDF per manager (every round, against the reference), and the allocations the
    managers chose over time in the first round for 4 functions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = out["records"]
    logs: dict[int, list[float]] = {}
    for rs in records["fixed"]:
        for r in rs:
            if r["outcome"] == "success":
                logs.setdefault(r["idx"], []).append(float(np.log(r["exec_s"])))
    ref = {i: float(np.exp(np.mean(v))) for i, v in logs.items()}
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, rounds in records.items():
        x = np.sort(
            [
                r["exec_s"] / ref[r["idx"]]
                for rs in rounds
                for r in rs
                if r["outcome"] == "success" and r["idx"] in ref
            ]
        )
        if x.size:
            ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("RFET (vs the geometric mean of the invocation's Fixed runs)")
    ax.set_ylabel("share of invocations")
    ax.legend()
    ax.grid(alpha=0.3)
    paths = [folder / "real_rfet_cdf.png"]
    fig.savefig(paths[0], dpi=110, bbox_inches="tight")
    plt.close(fig)
    managed = [m for m in records if m != "fixed"]
    if managed:
        names = ["pyloop", "matmul", "memhog", "sleepy"]
        fig, axes = plt.subplots(len(names), 2, figsize=(9, 2 * len(names)), sharex=True)
        for row, name in zip(axes, names, strict=True):
            for m in managed:
                rs = sorted(
                    (r for r in records[m][0] if r["function"] == name),
                    key=lambda r: r["start_s"],
                )
                t = [r["start_s"] for r in rs]
                row[0].step(t, [r["cpu_cores"] for r in rs], where="post", label=m)
                row[1].step(t, [r["mem_mb"] for r in rs], where="post", label=m)
            row[0].set_ylabel(f"{name}\ncores")
            row[1].set_ylabel("MB")
        axes[0][0].legend(fontsize=7)
        axes[-1][0].set_xlabel("s")
        axes[-1][1].set_xlabel("s")
        paths.append(folder / "real_allocations.png")
        fig.savefig(paths[1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths
