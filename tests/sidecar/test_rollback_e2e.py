"""A model that fails at run time is rolled back for good: across a real daemon restart, to the
registry version that ran before it (issue 15.4).

A real ``faasrm sidecar run`` over a real v1 cgroup follows an in-process trainer's registry. v1
is a good model; v2 passes every check a node makes before it swaps a model in, but returns NaN
once 12 invocations are pending.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest
from daemon_helpers import Daemon, free_port, write_config
from sidecar_helpers import onnx_policy, write_policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from trainer_helpers import TOKEN, ServerThread  # noqa: E402

from training.service import publish  # noqa: E402

pytest.importorskip("onnxruntime")


def _registry(d: Daemon) -> tuple[str, dict]:
    status, body = d.call("/debug/model")
    assert status == 200, body
    return body["current"]["id"], body["registry"]


def _wait_version(d: Daemon, version: int, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        model, reg = _registry(d)
        if reg["active_version"] == version:
            return model
        assert time.monotonic() < deadline, reg
        time.sleep(0.05)


def _busy_invocations(d: Daemon, rel: str, n: int) -> list[str]:
    """``n`` invocations started with 12 pending; the model that decided each."""
    models = []
    for _ in range(n):
        status, s = d.call("/v1/invocations", {"container": rel, "function": "fr", "pending": 12})
        assert status == 200, s
        models.append(s["model"])
        assert d.call(f"/v1/invocations/{s['invocation']}/end", {})[0] == 200
    return models


def test_a_runtime_rollback_survives_a_restart(tmp_path: Path, boxes) -> None:
    box = boxes("r@1")
    port = free_port()
    with ServerThread(tmp_path / "trainer") as srv:
        publish(srv.url, TOKEN, onnx_policy("user"))
        cfg = write_config(
            tmp_path,
            port,
            {box.rel: ("fr", 1.0, 256)},
            tmp_path / "no-local-model.onnx",
            extra=(
                f"[shipper]\nurl = '{srv.url}'\ntoken = '{TOKEN}'",
                f"[model_poller]\nenabled = true\ndir = '{tmp_path / 'models'}'\nwait_s = 0.5\n"
                "backoff_initial_s = 0.1\nbackoff_max_s = 0.5",
            ),
        )
        d = Daemon(cfg, port, tmp_path / "daemon.log")
        try:
            d.wait_ready()
            v1 = _wait_version(d, 1)
            assert _busy_invocations(d, box.rel, 1) == [v1]
            publish(srv.url, TOKEN, onnx_policy("nan_when_busy"))
            v2 = _wait_version(d, 2)
            assert v2 != v1
        finally:
            assert d.stop() == 0
        # a restart while v2 runs: v2 again, and v1 is still what a rollback returns to
        d = Daemon(cfg, port, tmp_path / "daemon2.log")
        try:
            d.wait_ready()
            model, reg = _registry(d)
            assert model == v2 and reg["active_version"] == 2 and reg["previous_version"] == 1
            # three failed decisions (the rule decided each): back to v1, and everyone says so
            assert _busy_invocations(d, box.rel, 3) == ["fallback"] * 3
            model, reg = _registry(d)
            assert model == v1 and reg["active_version"] == 1, reg
            assert reg["history"][-1]["result"] == "rolled_back", reg["history"]
            active = json.loads((tmp_path / "models" / "active.json").read_text())
            assert active["version"] == 1 and active["model"] == v1, active
        finally:
            assert d.stop() == 0
        # after another restart v1 runs, and v2, which the registry still offers, is not taken
        d = Daemon(cfg, port, tmp_path / "daemon3.log")
        try:
            d.wait_ready()
            model, reg = _registry(d)
            assert model == v1 and reg["active_version"] == 1, reg
            polls = reg["polls"]
            deadline = time.monotonic() + 20
            while reg["polls"] < polls + 2:
                assert time.monotonic() < deadline, reg
                time.sleep(0.05)
                model, reg = _registry(d)
            assert model == v1 and reg["active_version"] == 1, reg
            assert _busy_invocations(d, box.rel, 4) == [v1] * 4
        finally:
            assert d.stop() == 0


def _reload(d: Daemon) -> None:
    """SIGHUP, and wait until the daemon logged one more reload."""
    n = d.log.read_text().count('"msg": "reloaded"')
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.log.read_text().count('"msg": "reloaded"') == n:
        assert time.monotonic() < deadline, "no reload logged"
        time.sleep(0.05)


def test_a_local_model_rolled_back_at_run_time_is_not_loaded_again_until_it_changes(
    tmp_path: Path, boxes
) -> None:
    """The configured model file fails at run time (NaN once 12 invocations are pending) and is
    rolled back to the rule: neither a SIGHUP nor a restart loads that file again, until it is
    replaced by another model."""
    box = boxes("l@1")
    port = free_port()
    model = write_policy(tmp_path / "local.onnx", "nan_when_busy")
    cfg = write_config(tmp_path, port, {box.rel: ("fr", 1.0, 256)}, model)
    d = Daemon(cfg, port, tmp_path / "daemon.log")
    try:
        d.wait_ready()
        bad, _ = _registry(d)
        assert bad.startswith("sha256:")
        assert _busy_invocations(d, box.rel, 3) == ["fallback"] * 3
        assert _registry(d)[0] == "fallback"  # rolled back to the rule
        _reload(d)
        assert _registry(d)[0] == "fallback"
        assert _busy_invocations(d, box.rel, 1) == ["fallback"]
    finally:
        assert d.stop() == 0
    d = Daemon(cfg, port, tmp_path / "daemon2.log")
    try:
        d.wait_ready()
        status, body = d.call("/debug/model")
        assert body["current"]["id"] == "fallback", body
        assert "rolled back" in body["last_error"]["reason"], body
        write_policy(model, "user")  # a new file: loaded
        _reload(d)
        good, _ = _registry(d)
        assert good.startswith("sha256:") and good != bad
    finally:
        assert d.stop() == 0
