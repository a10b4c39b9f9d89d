"""Fuzz POST /v1/trajectories: malformed, truncated and hostile msgpack (the bad values and
structures ``faasrm bench faults`` posts) -> only 4xx, no crash, nothing stored."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trainer_helpers import ServerThread, batch, http, js, record

from sidecar.core.features import N_CONTEXT
from training.faults import BAD_ENVELOPE_VALUES as ENVELOPE_BAD
from training.faults import BAD_RECORD_VALUES as BAD
from training.faults import hostile_batches

VALID = batch("n1", 0, [record("n1", i) for i in range(3)])
REC = record("n1", 0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with ServerThread(tmp_path_factory.mktemp("fuzz") / "data", max_body_bytes=256 * 1024) as s:
        yield s


def _check(server, body: bytes) -> None:
    st_, _, out = http(
        server.url + "/v1/trajectories",
        body,
        headers={"Content-Type": "application/msgpack"},
        timeout=30,
    )
    assert st_ in (400, 413, 422), (st_, body[:80], out[:200])
    assert "error" in js(out)


def _hostile_objects():
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64 - 1),
        st.floats(allow_nan=True),
        st.text(max_size=20),
        st.binary(max_size=20),
    )
    return st.recursive(
        scalars,
        lambda kids: st.one_of(
            st.lists(kids, max_size=5), st.dictionaries(st.text(max_size=8), kids, max_size=5)
        ),
        max_leaves=30,
    )


settings.register_profile(
    "ingest",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@settings(settings.get_profile("ingest"))
@given(data=st.binary(max_size=2000))
def test_random_bytes(server, data: bytes) -> None:
    _check(server, data)


@settings(settings.get_profile("ingest"))
@given(cut=st.integers(0, len(VALID) - 1))
def test_truncated_valid_batch(server, cut: int) -> None:
    _check(server, VALID[:cut])


@settings(settings.get_profile("ingest"))
@given(obj=_hostile_objects())
def test_arbitrary_msgpack_objects(server, obj) -> None:
    try:
        body = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    _check(server, body)


@settings(settings.get_profile("ingest"))
@given(field=st.sampled_from(sorted(BAD)), pick=st.integers(0, 100), where=st.integers(0, 2))
def test_one_bad_field_in_a_record(server, field: str, pick: int, where: int) -> None:
    recs = [record("n1", i) for i in range(3)]
    recs[where][field] = BAD[field][pick % len(BAD[field])]
    try:
        body = batch("n1", 1, recs)
    except OverflowError:  # not even msgpack can carry it
        return
    _check(server, body)


@settings(settings.get_profile("ingest"))
@given(field=st.sampled_from(sorted(ENVELOPE_BAD)), pick=st.integers(0, 100), extra=st.booleans())
def test_bad_envelope(server, field: str, pick: int, extra: bool) -> None:
    env = {"schema_version": 1, "node_id": "n1", "seq": 0, "records": [REC]}
    env[field] = ENVELOPE_BAD[field][pick % len(ENVELOPE_BAD[field])]
    if extra:
        env["surprise"] = 1
    try:
        body = msgpack.packb(env, use_bin_type=True)
    except OverflowError:
        return
    _check(server, body)


@pytest.mark.parametrize("body", hostile_batches(VALID))
def test_hostile_structures(server, body: bytes) -> None:
    _check(server, body)


def test_nothing_was_stored_and_the_server_is_healthy(server) -> None:
    # runs after the fuzzers (file order): not a single record got in, the service still answers
    st_, _, body = http(server.url + "/healthz", token=None)
    assert st_ == 200 and js(body)["records"] == 0 and js(body)["batches"] == 0
    assert http(server.url + "/v1/trajectories", VALID)[0] == 200


# ---------------------------------------------------------------- fast check == exact loop
# decode_batch validates a batch column-wise first and falls back to the record-by-record loop
# only when that check says no. It must never accept what the loop refuses, nor count differently.
EDGE = {
    "reward": [None, True, 0, -1e6, 1e6, 1e6 + 1],
    "time": [0, 1e308, -0.0, True],
    "duration_s": [0, 1e308, True],
    "logp": [-1e308, 1e-6, 2e-6, -1, True],
    "context": [
        [1e308] * N_CONTEXT,
        [1e308, -1e308] * (N_CONTEXT // 2),
        [1] * N_CONTEXT,
        [1.0] * (N_CONTEXT - 1) + [True],
        [2**63] * N_CONTEXT,
        [-(2**63)] * N_CONTEXT,
        [1e300] * N_CONTEXT,
    ],
    "cpu_block": [
        [[1e308, 1e308, -1e308]] * 8,
        [[1, 2, 3]] * 8,
        [[1.0, 2.0, False]] * 8,
        [[1e300, 1e300, 1e300]] * 8,
    ],
    "action": [0, 63, True, 2**63 - 1],
    "v": [True, 1.0],
    "outcome": ["success", "lost", ("success",)],
}


def _outcome(body: bytes, exact: bool):
    from unittest import mock

    from sidecar.core import record as record_mod
    from training import service

    ctx = (
        mock.patch.object(record_mod, "_check_fast", return_value=None)
        if exact
        else mock.patch.object(record_mod, "_check_fast", record_mod._check_fast)
    )
    with ctx:
        try:
            b = service.decode_batch(body, 100)
            return ("ok", b.node_id, b.seq, b.n, b.rewarded)
        except service.BatchError as exc:
            return ("err", exc.status, exc.reason)


@settings(max_examples=400, deadline=None)
@given(
    muts=st.lists(
        st.tuples(
            st.integers(0, 3), st.sampled_from(sorted(set(BAD) | set(EDGE))), st.integers(0, 100)
        ),
        max_size=3,
    ),
    n=st.integers(1, 4),
)
def test_fast_check_agrees_with_the_exact_loop(muts, n: int) -> None:
    recs = [record("n1", i, reward=None if i == 2 else -0.1) for i in range(n)]
    for where, field, pick in muts:
        values = BAD.get(field, []) + EDGE.get(field, [])
        recs[where % n][field] = values[pick % len(values)]
    try:
        body = batch("n1", 1, recs)
    except (OverflowError, ValueError, TypeError):
        return
    assert _outcome(body, exact=False) == _outcome(body, exact=True)


def test_fast_check_never_hides_a_per_record_overflow() -> None:
    # record 0's arrays sum past the float range (the loop refuses it); record 1 cancels it out
    a, b = record("n1", 0), record("n1", 1)
    a["context"] = [1e308] + [0.0] * (N_CONTEXT - 1)
    a["cpu_block"] = [[1e308, 0.0, 0.0]] + [[0.0] * 3] * 7
    b["context"] = [-1e308] + [0.0] * (N_CONTEXT - 1)
    b["cpu_block"] = [[-1e308, 0.0, 0.0]] + [[0.0] * 3] * 7
    body = batch("n1", 0, [a, b])
    assert _outcome(body, exact=True)[:2] == ("err", 400)
    assert _outcome(body, exact=False) == _outcome(body, exact=True)


F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("context", [1e308] + [0.0] * (N_CONTEXT - 1)),
        ("context", [0.0] * (N_CONTEXT - 1) + [-F32_MAX * 1.0001]),
        ("cpu_block", [[0.0, 3.5e38, 0.0]] + [[0.0] * 3] * 7),
        ("mem_block", [[0.0] * 3] * 7 + [[0.0, 0.0, -1e39]]),
        ("logp", -1e39),
    ],
)
def test_values_beyond_float32_are_refused_on_both_paths(field: str, value) -> None:
    """The learner trains in float32: a value finite in float64 but infinite there (a 1e308
    context value) would turn its batch into NaNs, so neither the fast check nor the exact loop
    may let it in."""
    rec = record("n1", 1)
    rec[field] = value
    body = batch("n1", 0, [record("n1", 0), rec])
    fast, exact = _outcome(body, exact=False), _outcome(body, exact=True)
    assert fast == exact and exact[:2] == ("err", 400), (fast, exact)
    assert "records[1]" in exact[2] and "float32" in exact[2]


def test_the_float32_range_itself_is_accepted_on_both_paths() -> None:
    rec = record("n1", 0)
    rec["context"] = [F32_MAX, -F32_MAX] * (N_CONTEXT // 2)
    rec["cpu_block"] = [[F32_MAX, -F32_MAX, 0.0]] * 8
    rec["logp"] = -F32_MAX
    body = batch("n1", 0, [rec])
    assert _outcome(body, exact=False) == _outcome(body, exact=True) == ("ok", "n1", 0, 1, 1)
