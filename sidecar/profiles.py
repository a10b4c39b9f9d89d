"""Function profiles: what a node has learned about each function, kept across restarts.

The safeguard's remembered peaks (a memory spike seen once, the CPU burst, the input growth,
the peaks' spread, the run count) and the policy's per-function statistics live in the engine.
Without this file a restart forgets them: every function calibrates again at its user's size,
and a spike seen before the restart is harvested into an OOM kill after it. The daemon saves
the file every ``[actuation] profiles_save_s`` and at shutdown (``sidecar.durable``), and reads
it at start-up. A SIGKILL loses at most the invocations since the last save.

A file that cannot be used is logged and ignored, never fatal: the node then starts as the
reference does, with no profiles. Within a usable file an entry that does not parse is skipped
alone. Monotonic times are stored as Unix times (a reboot restarts the monotonic clock). A
function's last allocation is in grid units, so it is dropped when the grid changed; the
function then calibrates once at its user's size, keeping its peaks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.safeguard import FAILURE, FIRST, SafeguardState
from sidecar.core.stats import FunctionStats
from sidecar.durable import write_atomic

log = logging.getLogger("faasrm.profiles")

VERSION = 1
_STATS = tuple(f.name for f in dataclasses.fields(FunctionStats))
_GUARD = tuple(f.name for f in dataclasses.fields(SafeguardState))
_MONOTONIC = ("last_arrival_s", "last_safeguard_s")
"""FunctionStats fields on the engine's monotonic clock."""


def snapshot(
    stats: Mapping[str, FunctionStats],
    guards: Mapping[str, SafeguardState],
    grid: ResourceGrid,
    mono_to_wall: float,
) -> dict[str, Any]:
    """The profiles as JSON-ready data, least recently used function first (the engine's order).

    ``mono_to_wall``: Unix time minus monotonic time, now."""
    functions = {}
    for name, st in stats.items():
        gs = guards.get(name)
        if gs is None:
            continue
        s = vars(st).copy()  # the fields, copied in C: this runs on the event loop
        for k in _MONOTONIC:
            s[k] += mono_to_wall
        g = vars(gs).copy()
        if gs.last_alloc is not None:
            g["last_alloc"] = list(gs.last_alloc)
        functions[name] = {"stats": s, "guard": g}
    return {"version": VERSION, "grid": dataclasses.asdict(grid), "functions": functions}


def _number(value: Any, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    if integer:
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{value!r} is not a count")
        return value
    value = float(value)
    if math.isinf(value):
        raise ValueError("infinite")
    return value


def _fill(obj: Any, names: tuple[str, ...], data: Any, special: tuple[str, ...]) -> None:
    """Set ``obj``'s numeric fields from ``data`` (missing keys keep their defaults)."""
    if not isinstance(data, dict):
        raise ValueError("not a table")
    for name in names:
        if name in special or name not in data:
            continue
        default = getattr(obj, name)
        setattr(obj, name, _number(data[name], isinstance(default, int)))


def _entry(
    entry: Any, same_grid: bool, grid: ResourceGrid, wall_to_mono: float
) -> tuple[FunctionStats, SafeguardState]:
    if not isinstance(entry, dict):
        raise ValueError("not a table")
    st = FunctionStats()
    _fill(st, _STATS, entry.get("stats"), ())
    for k in _MONOTONIC:
        setattr(st, k, getattr(st, k) + wall_to_mono)
    gs = SafeguardState()
    g = entry.get("guard")
    _fill(gs, _GUARD, g, ("calibrate", "last_alloc"))
    calibrate = g.get("calibrate", FIRST)
    if calibrate not in (FIRST, FAILURE, None):
        raise ValueError(f"calibrate {calibrate!r}")
    gs.calibrate = calibrate
    last = g.get("last_alloc")
    if last is not None and same_grid:
        if (
            not isinstance(last, list)
            or len(last) != 2
            or not all(type(u) is int for u in last)
            or not (1 <= last[0] <= grid.cpu_units and 1 <= last[1] <= grid.mem_units)
        ):
            raise ValueError(f"last_alloc {last!r}")
        gs.last_alloc = Alloc(*last)
    return st, gs


def restore(
    data: Any, grid: ResourceGrid, wall_to_mono: float
) -> tuple[dict[str, tuple[FunctionStats, SafeguardState]], int]:
    """(function -> its stats and safeguard state, in the file's order; entries skipped).

    ``wall_to_mono``: monotonic time minus Unix time, now. ValueError for a file of another
    version or shape."""
    if not isinstance(data, dict) or data.get("version") != VERSION:
        version = data.get("version") if isinstance(data, dict) else None
        raise ValueError(f"version {version!r}, this host reads {VERSION}")
    functions = data.get("functions")
    if not isinstance(functions, dict):
        raise ValueError("no functions table")
    same_grid = data.get("grid") == dataclasses.asdict(grid)
    out: dict[str, tuple[FunctionStats, SafeguardState]] = {}
    skipped = 0
    for name, entry in functions.items():
        try:
            out[name] = _entry(entry, same_grid, grid, wall_to_mono)
        except (ValueError, TypeError, AttributeError):
            skipped += 1
    return out, skipped


def encode(data: dict[str, Any]) -> bytes:
    """A ``snapshot`` as JSON, one function at a time: each ``json.dumps`` call is short, so a
    save from a worker thread lets the event loop run between them (one call over 10,000
    functions holds the GIL for a quarter of a second)."""
    head = json.dumps({k: v for k, v in data.items() if k != "functions"}, separators=(",", ":"))
    body = ",".join(
        f"{json.dumps(name)}:{json.dumps(entry, separators=(',', ':'))}"
        for name, entry in data["functions"].items()
    )
    return f'{head[:-1]},"functions":{{{body}}}}}'.encode()


def save(path: str | Path, data: dict[str, Any]) -> None:
    """Write a ``snapshot`` durably (call it off the event loop for a large one)."""
    write_atomic(path, encode(data))


def load(
    path: str | Path, grid: ResourceGrid, wall_to_mono: float
) -> dict[str, tuple[FunctionStats, SafeguardState]]:
    """The profiles in ``path``; empty (and logged) when it is missing or unusable."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.error("function profiles unreadable; starting without", extra={"reason": str(exc)})
        return {}
    try:
        functions, skipped = restore(json.loads(raw), grid, wall_to_mono)
    except ValueError as exc:  # json's errors are ValueErrors too
        log.error(
            "function profiles unusable; starting without",
            extra={"path": str(path), "reason": str(exc)[:200]},
        )
        return {}
    if skipped:
        log.warning("function profiles: entries skipped", extra={"skipped": skipped})
    return functions
