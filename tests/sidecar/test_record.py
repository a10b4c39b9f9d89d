"""The trajectory record: its wire format, version, batch validation and learnable arrays."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from sidecar_helpers import GRID

from sidecar.core.features import FEATURE_VERSION, N_BLOCK, N_CONTEXT, schema_hash
from sidecar.core.grid import Alloc, ResourceGrid
from sidecar.core.record import (
    RECORD_VERSION,
    REQUIRED,
    Record,
    RecordError,
    check_batch,
    learnable,
)
from sidecar.spool import encode


def make(i: int = 0, node: str = "n1", reward: float | None = -0.25, grid=GRID) -> Record:
    rng = np.random.default_rng(i)
    mask = np.zeros(grid.n, dtype=bool)
    mask[3 : grid.n - 2] = True
    return Record(
        node=node,
        invocation=f"inv-{i}",
        function="thumbnail",
        container="c1",
        time=1.7e9 + i,
        grid=grid,
        model="sha256:0123456789ab",
        context=rng.normal(0, 1, N_CONTEXT).astype(np.float32),
        cpu_block=rng.normal(0, 1, (grid.cpu_units, N_BLOCK)).astype(np.float32),
        mem_block=rng.normal(0, 1, (grid.mem_units, N_BLOCK)).astype(np.float32),
        mask=mask,
        action=5,
        logp=-1.5,
        user=Alloc(4, 4),
        alloc=grid.alloc(5),
        reason="cpu=harvest,mem=harvest",
        reward=reward,
        baseline_s=0.2 if reward is not None else None,
        duration_s=0.25,
        outcome="success",
        cpu_peak_cores=0.4,
        mem_peak_mb=40.0,
        give_backs=["cpu"],
        inferred=False,
    )


def decoded(*maps: dict) -> tuple:
    """Records as the trainer decodes a batch body (arrays as tuples)."""
    return tuple(msgpack.unpackb(encode(m), raw=False, use_list=False) for m in maps)


def test_pack_is_the_version_1_wire_format_byte_for_byte() -> None:
    r = make()
    g = GRID
    expected = {
        "v": 1,
        "node": "n1",
        "invocation": "inv-0",
        "function": "thumbnail",
        "container": "c1",
        "time": 1.7e9,
        "feature_version": FEATURE_VERSION,
        "schema_hash": schema_hash(),
        "grid": [g.cpu_unit_cores, g.cpu_units, g.mem_unit_mb, g.mem_units],
        "model": "sha256:0123456789ab",
        "context": r.context.tolist(),
        "cpu_block": r.cpu_block.tolist(),
        "mem_block": r.mem_block.tolist(),
        "mask": np.packbits(r.mask).tobytes(),
        "action": 5,
        "logp": -1.5,
        "user": [4, 4],
        "alloc": list(g.alloc(5)),
        "reason": "cpu=harvest,mem=harvest",
        "reward": -0.25,
        "baseline_s": 0.2,
        "duration_s": 0.25,
        "outcome": "success",
        "cpu_peak_cores": 0.4,
        "mem_peak_mb": 40.0,
        "give_backs": ["cpu"],
        "inferred": False,
    }
    assert RECORD_VERSION == 1
    assert encode(r.pack()) == msgpack.packb(expected, use_bin_type=True)
    assert set(REQUIRED) <= set(expected)


def test_round_trip_through_the_spool_encoding_validation_and_learner_arrays() -> None:
    recs = [make(i, reward=None if i == 1 else -0.1 * i) for i in range(3)]
    assert check_batch(decoded(*(r.pack() for r in recs)), "n1") == 2
    b = learnable([msgpack.unpackb(encode(r.pack()), raw=False) for r in recs], GRID)
    assert b is not None and len(b.action) == 2  # the unrewarded record is not learnable
    for k, r in zip((0, 1), (recs[0], recs[2])):
        np.testing.assert_array_equal(b.context[k], r.context)
        np.testing.assert_array_equal(b.cpu[k], r.cpu_block)
        np.testing.assert_array_equal(b.mem[k], r.mem_block)
        np.testing.assert_array_equal(b.mask[k], r.mask)
        assert b.action[k] == r.action and b.logp[k] == r.logp
        assert b.reward[k] == pytest.approx(r.reward)


def test_learnable_keeps_only_this_grids_rewarded_finite_records() -> None:
    other = ResourceGrid(cpu_unit_cores=0.5, cpu_units=8, mem_unit_mb=64.0, mem_units=8)
    nan_logp = make(3).pack() | {"logp": math.nan}
    maps = [make(0).pack(), make(1, grid=other).pack(), make(2, reward=None).pack(), nan_logp]
    b = learnable(maps, GRID)
    assert b is not None and len(b.action) == 1
    assert learnable(maps[1:], GRID) is None


def test_a_newer_record_version_is_told_apart_from_a_malformed_one() -> None:
    newer = make().pack() | {"v": RECORD_VERSION + 1}
    with pytest.raises(RecordError) as e:
        check_batch(decoded(make(0).pack(), newer), "n1")
    assert e.value.unknown_version and str(e.value) == "records[1]: unknown record version 2"
    with pytest.raises(RecordError) as e:
        check_batch(decoded(make().pack() | {"v": "1"}), "n1")
    assert not e.value.unknown_version and "v must be an integer" in str(e.value)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"node": "n2"}, "records[0].node differs from node_id"),
        ({"outcome": "exploded"}, "records[0].outcome must be one of success, failure, oom, lost"),
        (
            {"duration_s": -1.0},
            "records[0]: time, duration_s >= 0, logp <= 0, all finite (logp in float32)",
        ),
        ({"reward": math.inf}, "records[0].reward must be null or a finite number"),
        (
            {"context": [1.0] * 3},
            f"records[0]: context needs {N_CONTEXT} numbers, blocks 8 and 8 rows",
        ),
        (
            {"context": [math.nan] * N_CONTEXT},
            "records[0]: context or blocks hold a number that is not finite in float32",
        ),
        (
            {"context": [1e308] + [0.0] * (N_CONTEXT - 1)},
            "records[0]: context or blocks hold a number that is not finite in float32",
        ),
        ({"action": 0}, "records[0].action 0 is not an allowed candidate"),
        ({"mask": b"\xff"}, "records[0].mask has 1 bytes, expected 8"),
    ],
)
def test_validation_names_the_record_and_the_reason(change: dict, reason: str) -> None:
    good = make(1).pack()
    with pytest.raises(RecordError) as e:
        check_batch(decoded(good | change), "n1")
    assert str(e.value) == reason and not e.value.unknown_version


def test_a_map_lacking_a_required_field_is_refused_by_the_spool_and_the_reader() -> None:
    m = make().pack()
    del m["logp"]
    with pytest.raises(ValueError, match="lacks logp"):
        encode(m)
    body = (msgpack.unpackb(msgpack.packb(m, use_bin_type=True), raw=False, use_list=False),)
    with pytest.raises(RecordError, match=r"records\[0\] lacks \['logp'\]"):
        check_batch(body, "n1")
