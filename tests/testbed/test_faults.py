"""Faults on the testbed: trainer and sidecar killed mid-stream; bad models refused."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from testbed_helpers import GRID_OV, publish_fresh_agent, unread_by_server

from training.processes import TOKEN, call
from training.service import TrainerError, publish
from training.testbed import Testbed, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sidecar"))
from sidecar_helpers import onnx_policy  # noqa: E402


def test_kill_trainer_and_sidecar_mid_stream_exactly_once(tmp_path: Path, v1_root: None) -> None:
    tb = Testbed(
        nodes=2,
        workers=2,
        workdir=tmp_path / "testbed",
        rate_per_worker=8.0,
        trainer_overrides={**GRID_OV, "learner.enabled": False},
        sidecar_overrides={"shipper": {"batch_records": 5, "interval_s": 0.05}},
    )
    try:
        tb.start()
        wait_for(lambda: tb.stored_count() > 20, 20, "records flowing")
        # 1. the trainer dies mid-stream (SIGKILL), comes back on the same port and data
        tb.trainer.stop(signal.SIGKILL)
        time.sleep(1.0)  # the nodes keep producing and retry with backoff
        tb.trainer.start()
        wait_for(lambda: tb.stored_count() >= len(tb.produced_ids()) - 10, 20, "catching up")
        # and node0 out of the outage's backoff (up to 16 s by now): its batch acknowledged, so
        # that its next POST comes at the shipping interval, within step 2's wait
        wait_for(
            lambda: (
                json.loads((tb.nodes[0].dir / "shipper.json").read_text()).get("pending") is None
            ),
            40,
            "node0 acknowledged after the outage",
            poll_s=0.02,
        )
        # 2. a sidecar dies mid-batch: its POST is in flight (the trainer is frozen) when killed
        tb.pause()
        node = tb.nodes[0]
        tb.trainer.proc.send_signal(signal.SIGSTOP)
        try:
            # new records for node0 so it has a batch to ship
            tb.resume()
            wait_for(
                lambda: json.loads((node.dir / "shipper.json").read_text()).get("pending"),
                10,
                "node0 with a batch in flight",
            )
            tb.pause()
            pending = wait_for(
                lambda: json.loads((node.dir / "shipper.json").read_text()).get("pending"),
                10,
                "node0 with a batch in flight",
            )
            # the batch is persisted before it is sent: kill only once the whole POST (at least
            # the batch's records) waits in the frozen trainer's socket, or the restarted node's
            # re-send would be the first copy, not a duplicate
            wait_for(
                lambda: (
                    unread_by_server(node.proc.pid, tb.trainer.port)
                    >= pending["end"] - pending["start"]
                ),
                10,
                "node0's POST in the frozen trainer's socket",
                poll_s=0.02,
            )
            node.stop(signal.SIGKILL)
        finally:
            tb.trainer.proc.send_signal(signal.SIGCONT)  # it now stores the dead node's batch
        node.start()
        tb.resume()
        time.sleep(1.5)
        tb.pause()
        produced = tb.produced_ids()
        wait_for(
            lambda: tb.stored_count() == len(produced),
            30,
            f"{len(produced)} records stored (have {tb.stored_count()})",
        )
        stored = tb.stored_ids()
        dup = [k for k, c in Counter(stored).items() if c > 1]
        assert not dup, f"duplicates: {dup[:5]}"
        assert sorted(stored) == sorted(produced)
        assert len(produced) > 50
        metrics = call(tb.trainer.url + "/metrics")[1].decode()
        dups = next(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('faasrm_trainer_ingest_batches_total{result="duplicate"}')
        )
        assert dups >= 1  # the killed node's in-flight batch was re-sent and stored once
    finally:
        tb.stop()


def test_bad_models_are_refused_by_the_registry_and_every_node_keeps_its_own(
    tmp_path: Path, v1_root: None
) -> None:
    tb = Testbed(
        nodes=3,
        workers=1,
        workdir=tmp_path / "testbed",
        rate_per_worker=4.0,
        trainer_overrides={**GRID_OV, "learner.enabled": False},
    )
    try:
        tb.start(drive=False)
        v1 = publish_fresh_agent(tb, tmp_path)
        tb.wait_all_on(v1, timeout_s=20)
        good = {n.id: n.model()["current"]["id"] for n in tb.nodes}
        tb.drive()
        bad = {
            "nan": onnx_policy("nan"),
            "corrupt": onnx_policy("harvest")[:200],
            "garbage": b"not an onnx file",
        }
        for kind, data in bad.items():
            with pytest.raises(TrainerError) as e:
                publish(tb.trainer.url, TOKEN, data)
            assert e.value.status == 422, kind
        # nothing new to long-poll for: every node keeps v1, which keeps deciding
        for n in tb.nodes:

            def decided(n=n):
                _, body = call(n.url + "/debug/allocations?limit=50")
                return [e for e in body["allocations"] if e.get("model") == good[n.id]]

            wait_for(decided, 20, f"{n.id} deciding with v{v1}")
        assert tb.versions() == {n.id: v1 for n in tb.nodes}
        assert {n.id: n.model()["current"]["id"] for n in tb.nodes} == good
    finally:
        tb.stop()
