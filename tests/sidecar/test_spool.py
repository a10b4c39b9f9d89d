"""The trajectory spool: bounded, drops oldest (counted), survives restarts and torn tails."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from sidecar.core.record import RECORD_VERSION, REQUIRED
from sidecar.spool import Spool, encode


def rec(i: int, pad: int = 0) -> dict:
    r = {k: None for k in REQUIRED}
    r.update(
        v=RECORD_VERSION,
        node="n",
        function="f",
        container="c",
        time=float(i),
        action=i,
        context=[0.0] * 16,
        cpu_block=[[0.0] * 3] * 8,
        mem_block=[[0.0] * 3] * 8,
        mask=b"\xff" * 8,
        logp=-0.5,
        reward=None,
        duration_s=1.0,
        outcome="success",
        pad="x" * pad,
    )
    return r


def test_append_and_read_back(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    for i in range(10):
        sp.append(rec(i))
    got = list(sp.iter_records())
    assert [r["action"] for r in got] == list(range(10))
    assert got[0]["mask"] == b"\xff" * 8 and got[0]["reward"] is None
    st = sp.stats()
    assert st.records == 10 and st.dropped == 0 and st.bytes > 0
    sp.close()


def test_encode_refuses_incomplete_records() -> None:
    r = rec(0)
    del r["reward"]
    with pytest.raises(ValueError, match="reward"):
        encode(r)


def test_bound_drops_oldest_and_counts_across_restarts(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=16384, segment_bytes=4096)
    for i in range(200):
        sp.append(rec(i, pad=100))
    st = sp.stats()
    assert st.bytes <= 16384 and st.dropped > 0 and st.records + st.dropped == 200
    kept = [r["action"] for r in sp.iter_records()]
    assert kept == list(range(200 - len(kept), 200))  # the newest survive, in order
    sp.close()
    sp2 = Spool(tmp_path, max_bytes=16384, segment_bytes=4096)
    assert sp2.stats().dropped == st.dropped
    assert [r["action"] for r in sp2.iter_records()] == kept
    sp2.append(rec(999))
    assert [r["action"] for r in sp2.iter_records()][-1] == 999
    sp2.close()


def test_torn_tail_is_skipped_and_never_appended_to(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    for i in range(3):
        sp.append(rec(i))
    seg = sp.segments()[-1]
    sp._fh.close()
    sp._fh = None
    data = seg.read_bytes()
    seg.write_bytes(data + msgpack.packb(rec(3))[:-7])  # a crash mid-write
    sp2 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    assert [r["action"] for r in sp2.iter_records()] == [0, 1, 2]
    assert sp2.corrupt >= 1
    sp2.append(rec(4))
    assert [r["action"] for r in sp2.iter_records()] == [0, 1, 2, 4]
    assert len(sp2.segments()) == 2
    with pytest.raises(ValueError):
        sp2.remove(sp2.segments()[-1])
    sp2.remove(sp2.segments()[0])
    assert [r["action"] for r in sp2.iter_records()] == [4]
    sp2.close()


def test_a_torn_tail_is_counted_once_however_often_it_is_read(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    for i in range(3):
        sp.append(rec(i))
    sp.close()
    seg = sp.segments()[-1]
    seg.write_bytes(seg.read_bytes() + msgpack.packb(rec(3))[:-7])  # a crash mid-write
    sp2 = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    for _ in range(3):
        assert [r["action"] for r in sp2.iter_records()] == [0, 1, 2]
    assert sp2.corrupt == 1 and sp2.stats().corrupt == 1
    sp2.close()
