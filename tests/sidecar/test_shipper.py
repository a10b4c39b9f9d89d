"""The shipper: spool -> trainer, exactly once across lost replies, restarts, outages, 413s."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from trainer_helpers import TOKEN, ServerThread, free_port, record  # noqa: E402

from sidecar.config import ShipperConfig  # noqa: E402
from sidecar.metrics import Metrics  # noqa: E402
from sidecar.shipper import Shipper  # noqa: E402
from sidecar.spool import Spool  # noqa: E402
from training.registry import TrajectoryStore  # noqa: E402


def make(tmp: Path, url: str, **kw) -> tuple[Spool, Shipper]:
    spool = Spool(tmp / "spool", max_bytes=10 * 2**20, segment_bytes=8192)
    cfg = ShipperConfig(
        enabled=True,
        url=url,
        token=TOKEN,
        state_file=str(tmp / "shipper.json"),
        batch_records=kw.pop("batch_records", 7),
        interval_s=0.05,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        timeout_s=5,
        **kw,
    )
    return spool, Shipper(spool, cfg, TOKEN)


async def drain(shipper: Shipper, max_steps: int = 500) -> list[str]:
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(max_steps):
            r = await shipper.ship_once(s)
            out.append(r)
            if r == "idle":
                break
    return out


def srv_metrics(srv) -> str:
    import urllib.request

    with urllib.request.urlopen(srv.url + "/metrics") as r:
        return r.read().decode()


def stored(tmp: Path) -> list[str]:
    st = TrajectoryStore(tmp / "data" / "trajectories.sqlite")
    try:
        return [r["invocation"] for r in st.iter_records()]
    finally:
        st.close()


def test_ships_everything_once_across_segments_and_restarts(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "data") as srv:
        spool, sh = make(tmp_path, srv.url)
        first_seq = sh.state.next_seq
        assert abs(first_seq / 1e6 - time.time()) < 60  # a fresh node starts at the clock
        produced = []
        for i in range(60):
            rec = record("n1", i)
            spool.append(rec)
            produced.append(rec["invocation"])
        assert len(spool.segments()) > 3
        res = asyncio.run(drain(sh))
        n_batches = res.count("shipped")
        assert res[-1] == "idle" and n_batches >= 9  # 7 per batch, batches end at segments
        assert len(spool.segments()) == 1  # shipped segments deleted, the current one kept
        # a restart (new spool, new shipper from the state file) ships only what is new
        spool.close()
        spool, sh = make(tmp_path, srv.url)
        assert sh.state.next_seq == first_seq + n_batches
        for i in range(60, 75):
            rec = record("n1", i)
            spool.append(rec)
            produced.append(rec["invocation"])
        asyncio.run(drain(sh))
    assert stored(tmp_path) == produced


def test_lost_reply_is_resent_and_stored_once(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "data") as srv:
        spool, sh = make(tmp_path, srv.url)
        for i in range(10):
            spool.append(record("n1", i))
        p = sh.plan()  # persisted as pending
        body = sh.body(p)

        async def post_and_crash() -> None:  # the batch arrives, the daemon dies before the ack
            async with aiohttp.ClientSession() as s:
                async with s.post(
                    srv.url + "/v1/trajectories",
                    data=body,
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ) as r:
                    assert r.status == 200

        asyncio.run(post_and_crash())
        for i in range(10, 20):  # more records arrive meanwhile: the resent batch must not grow
            spool.append(record("n1", i))
        spool.close()
        spool, sh2 = make(tmp_path, srv.url)
        assert sh2.state.pending == p
        asyncio.run(drain(sh2))
        metrics = srv_metrics(srv)
    assert stored(tmp_path) == [f"n1-inv-{i}" for i in range(20)]
    assert 'faasrm_trainer_ingest_batches_total{result="duplicate"} 1.0' in metrics


def test_trainer_down_then_back(tmp_path: Path) -> None:
    port = free_port()
    spool, sh = make(tmp_path, f"http://127.0.0.1:{port}")
    for i in range(12):
        spool.append(record("n1", i))
    res = asyncio.run(drain(sh, max_steps=3))
    assert res == ["retry"] * 3 and sh.last_error
    assert sh.state.pending is not None and sh.state.pending.seq == sh.state.next_seq
    with ServerThread(tmp_path / "data", port=port):
        assert asyncio.run(drain(sh))[-1] == "idle"
    assert stored(tmp_path) == [f"n1-inv-{i}" for i in range(12)]


def test_a_failure_streak_shows_in_the_metrics_until_the_trainer_answers(tmp_path: Path) -> None:
    """``faasrm_shipper_consecutive_failures`` (the "shipper failing" alert) counts the failed
    sends of ``run`` since the last answered one, and drops to 0 when the trainer is back."""
    port = free_port()
    spool = Spool(tmp_path / "spool", max_bytes=10 * 2**20, segment_bytes=8192)
    cfg = ShipperConfig(
        enabled=True,
        url=f"http://127.0.0.1:{port}",
        token=TOKEN,
        state_file=str(tmp_path / "shipper.json"),
        interval_s=0.05,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    metrics = Metrics()
    sh = Shipper(spool, cfg, TOKEN, metrics)
    for i in range(5):
        spool.append(record("n1", i))

    def failures() -> float:
        return metrics.registry.get_sample_value("faasrm_shipper_consecutive_failures")

    async def until(cond, what: str) -> None:
        for _ in range(600):
            if cond():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    async def main() -> None:
        task = asyncio.create_task(sh.run())
        try:
            await until(lambda: failures() >= 3, "three failed sends")
            with ServerThread(tmp_path / "data", port=port):
                await until(lambda: failures() == 0, "the streak to end")
                await until(lambda: sh.shipped_records == 5, "the records to be shipped")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert failures() == 0
    asyncio.run(main())
    assert stored(tmp_path) == [f"n1-inv-{i}" for i in range(5)]


def test_413_halves_the_batch_and_400_drops_it(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "data", max_body_bytes=4096) as srv:
        spool, sh = make(tmp_path, srv.url, batch_records=50)
        for i in range(10):
            spool.append(record("n1", i))
        bad = record("n1", 10)
        bad["outcome"] = "exploded"  # the trainer refuses it: dropped, counted, not a stall
        spool.append(bad)
        spool.append(record("n1", 11))
        res = asyncio.run(drain(sh))
        assert "split" in res and res[-1] == "idle"
    got = stored(tmp_path)
    assert got == [f"n1-inv-{i}" for i in range(12) if i != 10] and sh.dropped == 1


def test_backoff_is_exponential_with_jitter(tmp_path: Path) -> None:
    _, sh = make(tmp_path, "http://127.0.0.1:9")
    for attempt in range(8):
        cap = min(0.05, 0.01 * 2**attempt)
        for _ in range(20):
            assert cap / 2 <= sh.backoff_s(attempt) <= cap


def test_lost_state_file_never_loses_new_records(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "data") as srv:
        spool, sh = make(tmp_path, srv.url)
        for i in range(10):
            spool.append(record("n1", i))
        asyncio.run(drain(sh))
        old_seq = sh.state.next_seq
        spool.close()
        (tmp_path / "shipper.json").unlink()  # an operator wiped it
        time.sleep(0.01)
        spool, sh = make(tmp_path, srv.url)
        assert sh.state.next_seq > old_seq  # a fresh range: no new batch can look like an old one
        for i in range(10, 15):
            spool.append(record("n1", i))
        asyncio.run(drain(sh))
    got = stored(tmp_path)
    assert {f"n1-inv-{i}" for i in range(15)} <= set(got)


def test_spool_full_while_trainer_down_drops_oldest_counted_never_silently(tmp_path: Path) -> None:
    port = free_port()
    spool = Spool(tmp_path / "spool", max_bytes=5 * 8192, segment_bytes=8192)
    cfg = ShipperConfig(
        enabled=True,
        url=f"http://127.0.0.1:{port}",
        token=TOKEN,
        state_file=str(tmp_path / "shipper.json"),
        batch_records=7,
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
    )
    sh = Shipper(spool, cfg, TOKEN)
    produced = []

    def produce(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            rec = record("n1", i)
            spool.append(rec)
            produced.append(rec["invocation"])

    produce(0, 10)
    assert asyncio.run(drain(sh, max_steps=2)) == ["retry", "retry"]  # a batch is in flight
    produce(10, 120)  # ~1 KB each: far more than the 40 KB spool holds
    assert spool.dropped > 0
    with ServerThread(tmp_path / "data", port=port):
        res = asyncio.run(drain(sh))
        assert res[-1] == "idle"
    got = stored(tmp_path)
    assert len(got) == len(set(got))
    # every record is either stored or counted as dropped; the stored ones are the newest
    assert len(got) + spool.dropped == len(produced)
    assert got == produced[-len(got) :]


def test_records_after_quiet_restarts_are_shipped(tmp_path: Path) -> None:
    """Restarts with nothing written in between leave the spool with its one empty segment: it
    must be kept at close, or segment numbering restarts below the shipper's position and
    nothing written afterwards is ever shipped."""
    with ServerThread(tmp_path / "data") as srv:
        spool, sh = make(tmp_path, srv.url)
        for i in range(10):
            spool.append(record("n1", i))
        asyncio.run(drain(sh))
        for _ in range(3):  # quiet restarts: the shipper runs, nothing is written
            spool.close()
            spool, sh = make(tmp_path, srv.url)
            assert asyncio.run(drain(sh)) == ["idle"]
        for i in range(10, 15):
            spool.append(record("n1", i))
        asyncio.run(drain(sh))
        spool.close()
    assert stored(tmp_path) == [f"n1-inv-{i}" for i in range(15)]


def test_records_spooled_under_an_old_node_id_are_shipped_under_it(tmp_path: Path) -> None:
    """A node renamed between restarts still ships what it spooled before: each batch's envelope
    names the node its records carry (the trainer refuses a batch whose records name another)."""
    spool, _ = make(tmp_path, "http://127.0.0.1:9")
    produced = []
    for i in range(10):  # spooled while the trainer was unreachable, under the old name
        rec = record("old-name", i)
        spool.append(rec)
        produced.append(rec["invocation"])
    spool.close()
    with ServerThread(tmp_path / "data") as srv:
        spool, sh = make(tmp_path, srv.url)  # restarted as "n1"
        for i in range(10, 18):
            rec = record("n1", i)
            spool.append(rec)
            produced.append(rec["invocation"])
        res = asyncio.run(drain(sh))
        spool.close()
    assert res[-1] == "idle" and "dropped" not in res and sh.dropped == 0
    assert stored(tmp_path) == produced


def test_a_segment_holding_two_node_ids_ships_each_under_its_own(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "data") as srv:
        spool, sh = make(tmp_path, srv.url)
        produced = []
        for i, node in enumerate(["a"] * 2 + ["b"] * 2 + ["a"] * 2):
            rec = record(node, i)
            spool.append(rec)
            produced.append(rec["invocation"])
        assert len(spool.segments()) == 1
        res = asyncio.run(drain(sh))
        spool.close()
    assert res == ["shipped"] * 3 + ["idle"]
    assert stored(tmp_path) == produced


@pytest.mark.parametrize("shipped", [3, 7])
def test_a_full_spool_counts_as_dropped_only_the_records_never_shipped(
    tmp_path: Path, shipped: int
) -> None:
    """The spool drops its oldest segment, part or all of which the trainer already stored: only
    the rest is lost, so the stored and the dropped records add up to those produced."""
    with ServerThread(tmp_path / "data") as srv:
        spool, sh = make(tmp_path, srv.url, batch_records=shipped)
        spool.max_bytes = 4 * spool.segment_bytes
        for i in range(7):
            spool.append(record("n1", i))
        assert asyncio.run(drain(sh, max_steps=1)) == ["shipped"]
        first = spool.segments()[0]
        produced = 7
        while first in spool.segments():  # the trainer is away: the spool fills up
            spool.append(record("n1", produced))
            produced += 1
        assert sh.shipped_records == shipped
        asyncio.run(drain(sh))
        spool.close()
    assert len(stored(tmp_path)) + spool.dropped == produced
