"""Synthetic ``bench curves`` and ``bench real --records`` outputs for the report tests: the
simulator reproduces the curves exactly, and the real run is built with bench real's own report."""

from __future__ import annotations

import numpy as np

from training.invoker.agreement import simulated_curves
from training.invoker.curves import QUOTAS
from training.invoker.functions import SPECS
from training.invoker.invoker import Measurement, record_dicts, schedule
from training.invoker.real import SIDECAR_RULES, base_manager, report, sidecar_box

HOST = (2.0, 8192.0)
# phi, p, time at the user's size (s), idle worker MB, working-set growth a (MB at the curve's
# input) and exponent b: shapes like the real functions' (docs/duration-model.md)
SHAPES = {
    "pyloop": (1.0, 1.0, 0.33, 8, 0.0, 0.0),
    "matmul": (1.0, 2.0, 0.05, 44, 19.0, 2.0),
    "zlibmt": (1.0, 1.7, 0.11, 80, 1.0, 0.0),
    "image": (1.0, 1.0, 0.13, 20, 8.0, 2.0),
    "compress": (1.0, 0.9, 0.10, 78, 2.0, 0.0),
    "graph": (1.0, 1.0, 0.16, 12, 13.0, 1.0),
    "html": (1.0, 1.0, 0.12, 10, 9.0, 1.0),
    "memhog": (1.0, 0.8, 0.20, 9, 120.0, 1.0),
    "sleepy": (0.0, 1.0, 0.20, 8, 0.0, 0.0),
    "phased": (0.8, 0.85, 0.18, 9, 50.0, 1.0),
    "spiky": (1.0, 1.0, 0.15, 15, 2.0, 1.0),
}


def fake_curves() -> dict:
    """A ``bench curves --json`` output whose CPU curves the simulator reproduces exactly."""
    functions = []
    for spec in SPECS:
        phi, p, t_user, idle, a, b = SHAPES[spec.name]
        user_cpu = spec.mem_mb / 256.0
        times = simulated_curves(QUOTAS, user_cpu, t_user, [(phi, p)], HOST[0])[0]
        mid = spec.input_size(0.5)
        functions.append(
            {
                "function": spec.name,
                "size": mid,
                "user_cpu": user_cpu,
                "user_mem_mb": spec.mem_mb,
                "quotas": list(QUOTAS),
                "cpu_times_s": [float(x) for x in times],
                "fit": {"phi": phi},
                "idle_mb": float(idle),
                "ws_fit": {"idle_mb": float(idle), "a_mb": a, "b": b, "ref_size": mid},
            }
        )
    return {"cpus": 2, "period_us": 100_000, "load_avg": [0.4, 0.6], "functions": functions}


def fake_real(
    minutes: float = 0.5, managers=("fixed", "rule", "vpa"), settings: dict | None = None
) -> dict:
    """A one-round ``bench real --records --json`` output built with bench real's own report:
    ``rule`` runs pyloop 2x faster on 1 core and harvests sleepy; ``vpa`` harvests memory.
    ``settings``: each sidecar manager's ``--sidecar-set``, recorded as bench real records it."""
    sidecars = [m for m in managers if base_manager(m) in (*SIDECAR_RULES, "learned")]
    settings = {m: (settings or {}).get(m, {}) for m in sidecars}
    arrivals = schedule(minutes, 15.0, 0)
    rng = np.random.default_rng(0)
    measured, users = {}, {s.name: s for s in SPECS}
    for m in managers:
        rs = []
        for a in arrivals:
            s = users[a.container]
            t = SHAPES[a.container][2] * (a.size / s.input_size(0.5)) * rng.lognormal(0, 0.05)
            cpu, mem, k = s.mem_mb / 256.0, s.mem_mb, "user"
            if m == "rule" and a.container == "pyloop":
                t, cpu, k = t / 2, 1.0, "accelerated"
            elif m == "rule" and a.container == "sleepy":
                cpu, k = 0.5, "harvested"
            elif m == "vpa":
                mem, k = s.mem_mb / 2, "harvested"
            rs.append(
                Measurement(a.idx, a.container, a.size, a.t_s, a.t_s, t, t, "success", k, cpu, mem)
            )
        measured[m] = [rs]
    out = report(measured, dict.fromkeys(managers, 0), dict.fromkeys(managers, 0), arrivals)
    return {
        **out,
        "records": {m: [record_dicts(rs) for rs in rounds] for m, rounds in measured.items()},
        "functions": {
            s.name: {"user_mem_mb": s.mem_mb, "user_cpu_cores": s.mem_mb / 256.0} for s in SPECS
        },
        "config": {
            "minutes": minutes,
            "speedup": 15.0,
            "seed": 0,
            "repeats": 1,
            "cores_per_mb": 1 / 256.0,
            "model": None,
            "sidecar_settings": settings,
            "sidecar_boxes": {m: sidecar_box(kv) for m, kv in settings.items()},
            "grid": {
                "cpu_unit_cores": 0.25,
                "cpu_units": 8,
                "mem_unit_mb": 64.0,
                "mem_units": 8,
            },
        },
    }
