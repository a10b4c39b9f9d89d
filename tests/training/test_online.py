"""Online learning: records -> PPO update -> export -> gate -> promotion, in the trainer service."""

from __future__ import annotations

import hashlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_helpers import GRID, TOKEN, ServerThread, batch, http, js, record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sidecar"))
from sidecar_helpers import onnx_policy  # noqa: E402

from sidecar.config import ConfigError  # noqa: E402
from sidecar.core.features import FeatureEncoder  # noqa: E402
from sidecar.core.grid import Alloc  # noqa: E402
from sidecar.core.safeguard import SafeguardState  # noqa: E402
from training.export import export  # noqa: E402
from training.linear_policies import largest_agent  # noqa: E402
from training.online import (  # noqa: E402
    Diverged,
    gate,
    ppo_update,
    real_gate,
    records_to_batch,
)
from training.ppo import Agent  # noqa: E402
from training.service import GateConfig, LearnerConfig, load_config, publish  # noqa: E402


def test_records_to_batch_skips_unrewarded_and_other_grids() -> None:
    recs = [record("n", i) for i in range(6)]
    recs[1]["reward"] = None
    recs[2]["grid"] = [1.0, 8, 64.0, 8]
    b = records_to_batch(recs, GRID)
    assert b is not None and len(b["actions"]) == 4
    assert b["mask"].shape == (4, GRID.n) and b["ctx"].shape[0] == 4
    assert records_to_batch([recs[1]], GRID) is None


def test_records_of_another_feature_schema_are_neither_learned_nor_replayed(
    tmp_path: Path,
) -> None:
    """A node on another feature encoding (an older sidecar mid-rollout) ships rows whose columns
    mean something else: learning from them, or replaying them through the gate, is garbage."""
    recs = [_real_record(i) for i in range(50)]
    for r in recs[:10]:
        r["schema_hash"] = "0" * 16
    recs[10]["feature_version"] = -1
    b = records_to_batch(recs, GRID)
    assert b is not None and len(b["actions"]) == 39
    harvest = tmp_path / "harvest.onnx"
    harvest.write_bytes(onnx_policy("harvest"))
    assert real_gate(harvest, None, recs, GRID, GateConfig())["records"] == 39
    recs[11]["grid"] = [1.0, 8, 64.0, 8]  # another grid with the same block lengths
    assert real_gate(harvest, None, recs, GRID, GateConfig())["records"] == 38


def test_ppo_update_moves_the_policy_towards_rewarded_actions() -> None:
    torch.manual_seed(0)
    agent = Agent()
    recs = []
    for i in range(256):
        r = record("n", i % 4)  # 4 distinct observations
        good = i % 2 == 0
        r["action"] = 5 if good else 40
        mask = np.zeros(GRID.n, bool)
        mask[[5, 40]] = True
        r["mask"] = np.packbits(mask).tobytes()
        r["logp"] = float(np.log(0.5))
        r["reward"] = 1.0 if good else -1.0
        recs.append(r)
    b = records_to_batch(recs, GRID)
    five = torch.full((256,), 5)
    torch.set_num_threads(1)
    with torch.no_grad():
        before = agent.get_action_and_value(b["ctx"], b["cpu"], b["mem"], b["mask"], five)[1]
    cfg = LearnerConfig(learning_rate=3e-3, update_epochs=8)
    losses = ppo_update(agent, b, cfg)
    with torch.no_grad():
        after = agent.get_action_and_value(b["ctx"], b["cpu"], b["mem"], b["mask"], five)[1]
    assert after.exp().mean() > before.exp().mean() + 0.05
    assert set(losses) >= {"losses/policy_loss", "losses/value_loss", "losses/approx_kl"}


def test_ppo_update_stops_at_the_first_non_finite_loss() -> None:
    torch.manual_seed(0)
    b = records_to_batch([record("n", i) for i in range(64)], GRID)
    cfg = LearnerConfig(learning_rate=1e30, max_grad_norm=1e30)
    with pytest.raises(Diverged, match="non-finite loss in epoch 0"):
        ppo_update(Agent(), b, cfg)


def _real_record(i: int) -> dict:
    """A record with real encoder blocks: peaks at 1 core and 200 MB, user size 1 core/256 MB."""
    enc = FeatureEncoder(GRID)
    gs = SafeguardState(
        calibrate=None, last_alloc=Alloc(4, 4), recent_cpu_peak_cores=1.0, recent_mem_peak_mb=200.0
    )
    cpu, mem = enc.blocks(gs, Alloc(4, 4))
    r = record("n", i)
    r.update(
        cpu_block=cpu.tolist(),
        mem_block=mem.tolist(),
        cpu_peak_cores=1.0,
        mem_peak_mb=200.0,
        mask=np.packbits(np.ones(GRID.n, bool)).tobytes(),
    )
    return r


def test_real_check_refuses_a_candidate_worse_on_real_data(tmp_path: Path) -> None:
    harvest = tmp_path / "harvest.onnx"
    harvest.write_bytes(onnx_policy("harvest"))
    recs = [_real_record(i) for i in range(50)]
    rep = real_gate(harvest, None, recs, GRID, GateConfig())  # vs the fallback rule (user size)
    assert not rep["passed"]
    assert rep["candidate"]["pred_failure_rate"] == 1.0
    assert rep["current"]["pred_failure_rate"] == 0.0
    assert rep["reasons"] == [
        f"predicted {what} rate on 50 recent real records 100.000%, above the allowed 5.000%"
        for what in ("slowdown", "failure")
    ]
    # the same model against itself passes
    assert real_gate(harvest, harvest, recs, GRID, GateConfig())["passed"]


def _policies(tmp: Path, *kinds: str) -> list[Path]:
    out = []
    for kind in kinds:
        path = tmp / f"{kind}.onnx"
        path.write_bytes(onnx_policy(kind))
        out.append(path)
    return out


def test_gate_refuses_a_candidate_identical_to_the_running_model(tmp_path: Path) -> None:
    """No sideways step: ``largest`` beats both rules on the gate's preset, but it is what runs."""
    (largest,) = _policies(tmp_path, "largest")
    rep = gate(largest, largest, [], GRID, GateConfig())
    assert not rep["passed"] and not rep["sim"]["passed"]
    vs = rep["sim"]["vs"]
    assert vs["rule"]["passed"] and vs["smallest"]["passed"] and not vs["running"]["passed"]
    assert vs["running"]["mean_rfet_diff"] == 0.0 and vs["running"]["mean_rfet_diff_ci"] == [0, 0]
    assert rep["reason"] == (
        "mean RFET does not beat the running model's by more than 0: candidate - running = "
        "+0.00000, 95% interval [+0.00000, +0.00000]"
    )


def test_gate_refuses_a_candidate_worse_than_a_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fast_small`` (most CPU, least memory) beats a running ``harvest`` model and ``smallest``,
    not ``rule``: refused, and the reason names the rule. On the reference's hard memory limit
    (no OOM hold) its harvests are killed twice, which the gate names too."""
    from training.sim import presets

    real = presets.get_preset
    monkeypatch.setattr(
        presets, "get_preset", lambda *a, **k: real(*a, **k).with_cluster(oom_hold=False)
    )
    harvest, fast_small = _policies(tmp_path, "harvest", "fast_small")
    rep = gate(fast_small, harvest, [], GRID, GateConfig())
    sim = rep["sim"]
    assert not rep["passed"] and rep["real"]["passed"]
    assert sim["vs"]["running"]["passed"] and sim["vs"]["smallest"]["passed"]
    assert sim["vs"]["running"]["mean_rfet_diff_ci"][1] < 0
    assert not sim["vs"]["rule"]["passed"] and sim["vs"]["rule"]["mean_rfet_diff"] > 0
    lo, hi = sim["vs"]["rule"]["mean_rfet_diff_ci"]
    assert sim["reasons"] == [
        f"mean RFET does not beat rule's by more than 0: candidate - rule = "
        f"{sim['vs']['rule']['mean_rfet_diff']:+.5f}, 95% interval [{lo:+.5f}, {hi:+.5f}]",
        "2 OOM failures, more than rule's 0 + 0",
    ]
    assert rep["reason"] == "; ".join(sim["reasons"])
    m = sim["managers"]
    assert (
        m["candidate"]["failures"] == m["running"]["failures"] == 2 and m["rule"]["failures"] == 0
    )
    assert m["candidate"]["mean_rfet"] > m["rule"]["mean_rfet"]


def test_gate_promotes_a_candidate_that_beats_the_running_model_and_both_rules(
    tmp_path: Path,
) -> None:
    """``largest`` against a running ``harvest`` model: every paired interval lies below zero.
    The rules' and the running model's runs are cached; only the candidate is simulated anew."""
    harvest, largest, user = _policies(tmp_path, "harvest", "largest", "user")
    cache: dict = {}
    rep = gate(largest, harvest, [_real_record(i) for i in range(20)], GRID, GateConfig(), cache)
    assert rep["passed"] and rep["sim"]["passed"] and rep["real"]["passed"]
    assert rep["reason"] == (
        "beats the running model, rule, smallest in the simulator; no worse on recent real records"
    )
    sim = rep["sim"]
    assert set(sim["vs"]) == {"running", "rule", "smallest"}
    for other in sim["vs"].values():
        assert other["passed"] and other["mean_rfet_diff"] < other["mean_rfet_diff_ci"][1] < 0
    m = sim["managers"]
    assert m["candidate"]["failures"] == 0 == sim["max_failures"]
    assert m["candidate"]["mean_rfet"] < min(m[k]["mean_rfet"] for k in ("running", "rule"))
    assert sim["invocations"] > 0 and sim["preset"] == "sample"
    sha = hashlib.sha256(harvest.read_bytes()).hexdigest()
    assert sim["running_sha256"] == sha
    assert set(cache) == {
        ("sample", 12345, "rule"),
        ("sample", 12345, "smallest"),
        ("sample", 12345, sha),
    }
    rule_run = cache[("sample", 12345, "rule")]
    # another running model: the rules' runs are reused, the old running model's dropped
    gate(largest, user, [], GRID, GateConfig(), cache)
    user_sha = hashlib.sha256(user.read_bytes()).hexdigest()
    assert set(cache) == {
        ("sample", 12345, "rule"),
        ("sample", 12345, "smallest"),
        ("sample", 12345, user_sha),
    }
    assert cache[("sample", 12345, "rule")] is rule_run
    # with no running model, the candidate must beat both rules, and nothing else
    none = gate(largest, None, [], GRID, GateConfig(), cache)
    assert none["passed"] and set(none["sim"]["vs"]) == {"rule", "smallest"}
    # min_gain asks for more than the interval shows: refused
    big = GateConfig(min_gain=0.5)
    assert not gate(largest, harvest, [], GRID, big, cache)["sim"]["vs"]["rule"]["passed"]


def test_config_refuses_the_removed_gate_keys_naming_their_replacement(tmp_path: Path) -> None:
    old = tmp_path / "trainer.toml"
    old.write_text('token = "t"\n[gate]\nmax_rfet_ratio = 1.02\n')
    with pytest.raises(ConfigError, match=r"gate\.max_rfet_ratio was removed: .*gate\.min_gain"):
        load_config(str(old))
    with pytest.raises(ConfigError, match=r"gate\.max_slowdown_increase was removed"):
        load_config(None, {"token": "t", "gate.max_slowdown_increase": 0.01})
    with pytest.raises(ConfigError, match=r"gate\.min_gain must be >= 0"):
        load_config(None, {"token": "t", "gate.min_gain": -0.01})
    assert load_config(None, {"token": "t", "gate.min_gain": 0.002}).gate.min_gain == 0.002


def _publish_fresh_agent(url: str, tmp: Path, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    agent = Agent()
    path = tmp / f"seed{seed}.onnx"
    export(agent, path, args={"preset": "sample"}, grid=GRID)
    buf = io.BytesIO()
    torch.save({"agent": agent.state_dict()}, buf)
    return publish(url, TOKEN, path, checkpoint=buf.getvalue())


def _learner_decision(url: str, update: int, timeout_s: float = 60.0) -> dict:
    """The ``/debug/learner`` history entry of update ``update``, once it has been made."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        history = js(http(url + "/debug/learner")[2]).get("history", [])
        if len(history) >= update:
            return history[update - 1]
        time.sleep(0.1)
    raise AssertionError(f"no learner update {update} within {timeout_s} s")


def test_online_loop_promotes_only_a_better_update(tmp_path: Path) -> None:
    """The running model is a deliberately bad ``harvest`` policy published without a checkpoint;
    the learner starts from a checkpoint of ``largest`` (``learner.init_checkpoint``), which beats
    it and both rules on the gate's preset: its update is promoted. The next update starts from
    that version and changes no decision there: refused, the model stays (no sideways steps)."""
    init = tmp_path / "largest.pt"
    torch.save({"agent": largest_agent().state_dict()}, init)
    ov = {
        "learner.enabled": True,
        "learner.interval_s": 0.2,
        "learner.min_records": 40,
        "learner.init_checkpoint": str(init),
    }
    with ServerThread(tmp_path / "data", **ov) as srv:
        (harvest,) = _policies(tmp_path, "harvest")
        v1 = publish(srv.url, TOKEN, harvest)
        st, h, _ = http(srv.url + "/v1/models/latest")
        etag = h["ETag"]
        recs = [record("n1", i, reward=None if i % 10 == 0 else -0.05 * (i % 7)) for i in range(60)]
        assert http(srv.url + "/v1/trajectories", batch("n1", 0, recs))[0] == 200
        st, h, body = http(
            srv.url + "/v1/models/latest?wait=60",
            headers={"If-None-Match": etag},
            timeout=90,
        )
        assert st == 200 and int(h["X-Model-Version"]) == v1["version"] + 1
        meta = js(http(srv.url + f"/v1/models/{h['X-Model-Version']}/meta")[2])
        assert meta["source"] == "online" and meta["evaluation"]["passed"] is True
        assert meta["metadata"]["sha256"] == meta["sha256"]
        sim = meta["evaluation"]["sim"]
        assert sim["preset"] == "sample" and set(sim["vs"]) == {"running", "rule", "smallest"}
        assert all(v["mean_rfet_diff_ci"][1] < 0 for v in sim["vs"].values())
        assert sim["running_sha256"] == v1["sha256"]
        learner = js(http(srv.url + "/debug/learner")[2])
        assert learner["last"]["result"] == "promoted"
        assert learner["last"]["base"] == str(init)
        assert learner["last"]["losses"]["charts/batch_size"] == 54  # the 6 unrewarded skipped
        first = learner["history"][0]
        assert first["result"] == "promoted" and first["version"] == v1["version"] + 1
        assert first["gate"] == meta["evaluation"] and first["reason"].startswith("beats")

        recs = [record("n1", i, reward=-0.05 * (i % 7)) for i in range(60, 110)]
        assert http(srv.url + "/v1/trajectories", batch("n1", 1, recs))[0] == 200
        second = _learner_decision(srv.url, 2)
        assert second["result"] == "rejected" and second["version"] is None
        vs = second["gate"]["sim"]["vs"]
        assert vs["running"]["mean_rfet_diff_ci"] == [0.0, 0.0] and not vs["running"]["passed"]
        assert vs["rule"]["passed"] and vs["smallest"]["passed"]
        assert second["reason"].startswith("mean RFET does not beat the running model's")
        assert js(http(srv.url + "/v1/models")[2])["latest"] == v1["version"] + 1
        metrics = http(srv.url + "/metrics")[2].decode()
        assert 'faasrm_trainer_updates_total{result="promoted"} 1.0' in metrics
        assert 'faasrm_trainer_updates_total{result="rejected"} 1.0' in metrics
        assert "faasrm_trainer_model_version 2.0" in metrics


def test_online_loop_keeps_the_model_when_the_gate_fails(tmp_path: Path) -> None:
    """A PPO update of a fresh random agent does not beat the daemon's rule: refused."""
    ov = {
        "learner.enabled": True,
        "learner.interval_s": 0.2,
        "learner.min_records": 20,
    }
    with ServerThread(tmp_path / "data", **ov) as srv:
        _publish_fresh_agent(srv.url, tmp_path)
        assert (
            http(
                srv.url + "/v1/trajectories", batch("n1", 0, [record("n1", i) for i in range(30)])
            )[0]
            == 200
        )
        last = _learner_decision(srv.url, 1)
        assert last["result"] == "rejected" and last["gate"]["sim"]["passed"] is False
        assert not last["gate"]["sim"]["vs"]["rule"]["passed"]
        assert "mean RFET does not beat rule's" in last["reason"]
        assert set(last["gate"]["sim"]["managers"]) == {"candidate", "running", "rule", "smallest"}
        assert js(http(srv.url + "/v1/models")[2])["latest"] == 1


def test_a_diverged_update_is_rejected_and_its_candidate_removed(tmp_path: Path) -> None:
    """An update that leaves NaN in the agent (here: it starts from a checkpoint already
    poisoned) is recorded as rejected, never gated or published, and leaves no candidate file."""
    agent = Agent()
    with torch.no_grad():
        for p in agent.parameters():
            p.fill_(float("nan"))
    init = tmp_path / "nan.pt"
    torch.save({"agent": agent.state_dict()}, init)
    ov = {
        "learner.enabled": True,
        "learner.interval_s": 0.2,
        "learner.min_records": 20,
        "learner.init_checkpoint": str(init),
    }
    with ServerThread(tmp_path / "data", **ov) as srv:
        recs = [record("n1", i) for i in range(30)]
        assert http(srv.url + "/v1/trajectories", batch("n1", 0, recs))[0] == 200
        last = _learner_decision(srv.url, 1)
        assert last["result"] == "rejected" and last["gate"] is None, last
        assert last["reason"].startswith("training diverged")
        assert js(http(srv.url + "/v1/models")[2])["latest"] is None
        assert list((tmp_path / "data" / "candidates").iterdir()) == []


def test_a_gate_that_fails_is_recorded_as_an_error_and_its_candidate_removed(
    tmp_path: Path,
) -> None:
    """The running version's ONNX is gone from the registry's disk: the gate cannot run. The
    update is recorded as an error with the reason, the loop goes on, nothing is published."""
    ov = {"learner.enabled": True, "learner.interval_s": 0.2, "learner.min_records": 20}
    with ServerThread(tmp_path / "data", **ov) as srv:
        _publish_fresh_agent(srv.url, tmp_path)
        (tmp_path / "data" / "models" / "000001" / "model.onnx").unlink()
        recs = [record("n1", i) for i in range(30)]
        assert http(srv.url + "/v1/trajectories", batch("n1", 0, recs))[0] == 200
        last = _learner_decision(srv.url, 1, timeout_s=30)
        assert last["result"] == "error" and last["version"] is None, last
        assert last["reason"].startswith("the gate failed: FileNotFoundError"), last
        assert list((tmp_path / "data" / "candidates").iterdir()) == []
        assert js(http(srv.url + "/v1/models")[2])["latest"] == 1
        metrics = http(srv.url + "/metrics")[2].decode()
        assert 'faasrm_trainer_updates_total{result="error"} 1.0' in metrics
