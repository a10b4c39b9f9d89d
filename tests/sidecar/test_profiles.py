"""``sidecar.profiles``: what a node learned about each function survives a restart, and a file
that cannot be used costs the profiles, never the daemon."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import engine as engine_mod
from sidecar import profiles
from sidecar.config import ActuationConfig
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.safeguard import FIRST, HARVEST, SafeguardState, guard
from sidecar.core.stats import FunctionStats
from sidecar.engine import Engine

GRID = ResourceGrid(0.25, 8, 64.0, 8)
USER = Alloc(8, 8)

run = st.tuples(
    st.floats(0.05, 2.0),  # cpu peak, cores
    st.floats(8.0, 600.0),  # memory peak, MB
    st.booleans(),  # failed
    st.one_of(st.none(), st.floats(0.1, 1e4)),  # input size
    st.floats(0.01, 30.0),  # duration, s
)


def _lived(runs: list[tuple], t0: float) -> tuple[FunctionStats, SafeguardState]:
    """A function's state after ``runs``, through the real decision-time and end-time updates."""
    stats, gs = FunctionStats(), SafeguardState()
    now = t0
    for cpu, mem, failed, size, dur in runs:
        stats.on_arrival(now)
        g = guard(GRID, USER, gs, input_size=size)
        gs.observe(g, USER, cpu, mem, failed, size, 4.0, cpu * dur, dur, user_mem_mb=512.0)
        now += dur
        stats.on_completion(now, dur, cpu, mem, at_user_size=not failed, input_size=size)
        now += 1.0
    return stats, gs


def _fields(obj) -> dict:
    """Field values, NaN made comparable."""
    return {
        k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
        for k, v in dataclasses.asdict(obj).items()
    }


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(run, max_size=12), min_size=1, max_size=4), st.floats(-1e6, 1e6))
def test_saved_profiles_read_back_as_it_was(functions: list[list[tuple]], shift: float) -> None:
    """Every field of every function comes back, in order; monotonic times move with the clock
    (a new boot's monotonic clock reads ``shift`` seconds apart from the old one's)."""
    kept = {f"fn{i}": _lived(runs, 1000.0) for i, runs in enumerate(functions)}
    stats = {k: v[0] for k, v in kept.items()}
    guards = {k: v[1] for k, v in kept.items()}
    mono_to_wall = 1.7e9
    data = json.loads(profiles.encode(profiles.snapshot(stats, guards, GRID, mono_to_wall)))
    back, skipped = profiles.restore(data, GRID, -(mono_to_wall + shift))
    assert skipped == 0 and list(back) == list(kept)
    for name, (st_back, gs_back) in back.items():
        assert _fields(gs_back) == _fields(guards[name])
        want = _fields(stats[name])
        for k in ("last_arrival_s", "last_safeguard_s"):
            v = getattr(stats[name], k)
            if not math.isnan(v):
                want[k] = pytest.approx(v - shift, abs=1e-6)
        assert _fields(st_back) == want
        # and the safeguard decides the same box for the next invocation
        assert guard(GRID, USER, gs_back) == guard(GRID, USER, guards[name])


def test_a_node_with_no_functions_saves_a_valid_empty_file() -> None:
    data = json.loads(profiles.encode(profiles.snapshot({}, {}, GRID, 0.0)))
    assert data == {"version": profiles.VERSION, "grid": dataclasses.asdict(GRID), "functions": {}}
    assert profiles.restore(data, GRID, 0.0) == ({}, 0)


def _spiked() -> tuple[FunctionStats, SafeguardState]:
    """A function calibrated with a 300 MB spike, then a 40 MB run."""
    return _lived([(0.3, 300.0, False, None, 1.0), (0.3, 40.0, False, None, 1.0)], 0.0)


def test_a_remembered_spike_keeps_the_memory_floor_after_a_restart(tmp_path: Path) -> None:
    """The point of the file: the restarted node harvests above the spike, not at the last run."""
    stats, gs = _spiked()
    path = tmp_path / "profiles.json"
    profiles.save(path, profiles.snapshot({"f": stats}, {"f": gs}, GRID, 0.0))
    back = profiles.load(path, GRID, 0.0)
    g = guard(GRID, USER, back["f"][1])
    assert g.mem_mode == HARVEST and g.mem_lo * GRID.mem_unit_mb >= 300.0
    forgot = guard(GRID, USER, SafeguardState())  # what a node without the file decides
    assert forgot.mem_mode == FIRST


def test_a_changed_grid_drops_the_last_allocation_and_keeps_the_peaks(tmp_path: Path) -> None:
    stats, gs = _spiked()
    data = json.loads(profiles.encode(profiles.snapshot({"f": stats}, {"f": gs}, GRID, 0.0)))
    other = ResourceGrid(0.5, 4, 128.0, 4)
    back, skipped = profiles.restore(data, other, 0.0)
    gs_back = back["f"][1]
    assert skipped == 0 and gs_back.last_alloc is None
    assert gs_back.mem_peak_memory_mb == gs.mem_peak_memory_mb
    assert guard(other, Alloc(4, 4), gs_back).mem_mode == FIRST  # calibrates once on the new grid


def test_bad_entries_are_skipped_alone_and_a_bad_file_is_ignored(tmp_path: Path) -> None:
    stats, gs = _spiked()
    data = json.loads(profiles.encode(profiles.snapshot({"f": stats}, {"f": gs}, GRID, 0.0)))
    good = data["functions"]["f"]
    bad = {
        "text": {**good, "guard": {**good["guard"], "runs": "many"}},
        "negative count": {**good, "stats": {**good["stats"], "arrivals": -1}},
        "bool": {**good, "guard": {**good["guard"], "mem_peak_memory_mb": True}},
        "inf": {**good, "guard": {**good["guard"], "recent_mem_peak_mb": math.inf}},
        "mode": {**good, "guard": {**good["guard"], "calibrate": "sometimes"}},
        "alloc": {**good, "guard": {**good["guard"], "last_alloc": [9, 1]}},
        "shape": [1, 2],
        "no guard": {"stats": good["stats"]},
    }
    data["functions"].update(bad)
    back, skipped = profiles.restore(data, GRID, 0.0)
    assert list(back) == ["f"] and skipped == len(bad)
    path = tmp_path / "profiles.json"
    for text in ("{not json", json.dumps({**data, "version": 99}), "[]", '{"version": 1}'):
        path.write_text(text)
        assert profiles.load(path, GRID, 0.0) == {}
    assert profiles.load(tmp_path / "missing.json", GRID, 0.0) == {}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.sampled_from(["stats", "guard"]), st.data(), json_values)
def test_any_value_in_any_field_never_breaks_loading(
    tmp_path: Path, part: str, draw: st.DataObject, value
) -> None:
    """Fuzz: one field (or an unknown one) set to any JSON value; the file loads, that entry
    kept or skipped."""
    stats, gs = _spiked()
    data = json.loads(profiles.encode(profiles.snapshot({"f": stats}, {"f": gs}, GRID, 0.0)))
    field = draw.draw(st.sampled_from([*sorted(data["functions"]["f"][part]), "unknown"]))
    data["functions"]["f"][part][field] = value
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(data))
    back = profiles.load(path, GRID, 0.0)
    if back:
        st_back, gs_back = back["f"]
        guard(GRID, USER, gs_back)  # the safeguard can decide with whatever was kept
        assert isinstance(st_back.arrivals, int)


def _engine() -> Engine:
    return Engine(
        GRID, node_id="n", host_cores=2.0, host_mem_mb=4096.0, scorer=lambda: (None, "none")
    )


def test_the_engine_takes_profiles_oldest_first_and_keeps_its_own(monkeypatch) -> None:
    monkeypatch.setattr(engine_mod, "MAX_FUNCTIONS", 3)
    eng = _engine()
    seen, _ = eng._function("seen")
    kept = {name: _spiked() for name in ("a", "b", "c", "seen")}
    eng.remember(kept)
    # the oldest two of the file are forgotten beyond the limit; "seen" keeps this run's state
    assert list(eng.stats) == ["b", "c", "seen"]
    assert eng.stats["seen"] is seen and eng.guards["b"] is kept["b"][1]


def test_the_profiles_file_is_taken_beside_the_state_file() -> None:
    cfg = ActuationConfig(state_file="/var/lib/x/state.json")
    assert cfg.profiles_path == Path("/var/lib/x/profiles.json")
    assert ActuationConfig(state_file="/s.json", profiles_file="/h/f.json").profiles_path == Path(
        "/h/f.json"
    )
    assert ActuationConfig(profiles_file="").profiles_path is None
