"""End to end on one machine: 1 trainer + 3 sidecars, real cgroups and worker processes."""

from __future__ import annotations

from pathlib import Path

import torch
from testbed_helpers import GRID, GRID_OV, cgroup_gone

from training.linear_policies import largest_agent, onnx_policy
from training.processes import TOKEN, call
from training.service import call_trainer, publish
from training.testbed import Testbed, wait_for


def test_trajectories_update_promotion_propagation(tmp_path: Path, v1_root: None) -> None:
    """The nodes start on a deliberately bad ``harvest`` policy (no checkpoint); the learner
    starts from a checkpoint of ``largest``, which beats it and both rules on the gate's preset,
    so its first update is promoted and propagates."""
    init = tmp_path / "largest.pt"
    torch.save({"agent": largest_agent().state_dict()}, init)
    tb = Testbed(
        nodes=3,
        workers=2,
        workdir=tmp_path / "testbed",
        rate_per_worker=4.0,
        trainer_overrides={
            **GRID_OV,
            "learner.interval_s": 0.5,
            "learner.min_records": 40,
            "learner.init_checkpoint": str(init),
        },
    )
    try:
        tb.start(drive=False)
        v1 = publish(tb.trainer.url, TOKEN, onnx_policy("harvest", GRID))["version"]
        tb.wait_all_on(v1, timeout_s=20)
        v1_ids = {n.model()["current"]["id"] for n in tb.nodes}
        tb.drive()
        # the learner turns the nodes' trajectories into a gated update, promoted as v2
        latest = wait_for(
            lambda: (
                (call_trainer(tb.trainer.url + "/v1/models", TOKEN).get("latest") or 0) > v1
                and call_trainer(tb.trainer.url + "/v1/models", TOKEN)["latest"]
            ),
            60,
            "a promoted update",
        )
        meta = call_trainer(tb.trainer.url + f"/v1/models/{latest}/meta", TOKEN)
        assert meta["source"] == "online" and meta["evaluation"]["passed"]
        assert all(v["passed"] for v in meta["evaluation"]["sim"]["vs"].values())

        def all_on_latest():
            lv = call_trainer(tb.trainer.url + "/v1/models", TOKEN)["latest"]
            vs = tb.versions()
            return lv if all(v == lv for v in vs.values()) else None

        now = wait_for(all_on_latest, 30, "every node on the latest version")
        assert now >= latest
        # trajectories from every node reached the trainer
        from training.registry import TrajectoryStore

        st = TrajectoryStore(tb.trainer.dir / "data" / "trajectories.sqlite")
        nodes = {r["node"] for r in st.iter_records()}
        st.close()
        assert nodes == {"node0", "node1", "node2"}
        # the allocation traces show decisions made by a promoted update on every node (a later
        # update that beats it may still be promoted while we look)
        for n in tb.nodes:

            def decided(n=n):
                _, body = call(n.url + "/debug/allocations?limit=1000")
                return [e for e in body["allocations"] if e.get("model") not in v1_ids]

            entries = wait_for(decided, 30, f"{n.id} deciding with an updated model")
            assert entries[0]["chosen"]["cpu_cores"] > 0
        metrics = call(tb.trainer.url + "/metrics")[1]
        assert b'faasrm_trainer_updates_total{result="promoted"}' in metrics
    finally:
        tb.stop()
    assert cgroup_gone(tb.parent)
    assert all(n.proc.poll() is not None for n in tb.nodes) and tb.trainer.proc.poll() is not None
