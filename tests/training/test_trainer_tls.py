"""The trainer off the loopback interface: https or a refusal, and the nodes' clients (shipper,
model poller, publish) verifying its certificate against the configured CA."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import types
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import GRID, TOKEN, ServerThread, http, record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sidecar"))
from sidecar_helpers import onnx_policy  # noqa: E402

from sidecar.config import ConfigError, ModelPollerConfig, ShipperConfig  # noqa: E402
from sidecar.model_poller import ModelPoller  # noqa: E402
from sidecar.models import ModelManager  # noqa: E402
from sidecar.shipper import Shipper  # noqa: E402
from sidecar.spool import Spool  # noqa: E402
from training.service import load_config, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "training" / "trainer.example.toml"


@pytest.fixture
def tls(tmp_path: Path, debian_tool: Callable[..., str]) -> dict[str, str]:
    """A CA and a certificate for 127.0.0.1 signed by it, made by the script install.sh runs."""
    debian_tool("openssl", ["openssl"], "TLS test")
    d = tmp_path / "tls"
    subprocess.run(
        ["sh", str(REPO / "systemd" / "trainer-tls.sh"), str(d), "IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {"ca": str(d / "ca.crt"), "cert": str(d / "trainer.crt"), "key": str(d / "trainer.key")}


def test_plain_http_off_the_loopback_interface_is_refused(tmp_path: Path, tls) -> None:
    base = {"token": "t", "data_dir": str(tmp_path)}
    pair = {"tls_cert_file": tls["cert"], "tls_key_file": tls["key"]}
    for host in ("0.0.0.0", "::", "10.1.2.3", "trainer.example.org", ""):
        with pytest.raises(ConfigError, match="not a loopback address.*allow_plaintext"):
            load_config(None, {**base, "host": host})
        assert load_config(None, {**base, "host": host, "allow_plaintext": True}).host == host
        assert load_config(None, {**base, "host": host, **pair}).ssl_context() is not None
    for host in ("127.0.0.1", "127.0.0.5", "::1", "localhost"):
        assert load_config(None, {**base, "host": host}).ssl_context() is None
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, {**base, "tls_cert_file": tls["cert"]})
    with pytest.raises(ConfigError, match="tls_cert_file"):  # the CA's certificate, our key
        load_config(None, {**base, "tls_cert_file": tls["ca"], "tls_key_file": tls["key"]})
    # the installed example listens on every interface: with its pair, or not at all
    cfg = load_config(EXAMPLE, {**base, **pair})
    assert cfg.host == "0.0.0.0" and not cfg.allow_plaintext
    with pytest.raises(ConfigError, match="trainer.crt.*No such file"):
        load_config(EXAMPLE, base)  # the unit's credentials are not there outside systemd
    with pytest.raises(ConfigError, match="allow_plaintext"):
        load_config(EXAMPLE, {**base, "tls_cert_file": "", "tls_key_file": ""})


async def _run_until(run: Callable[[], Any], done: Callable[[], bool], what: str) -> None:
    """Run a client loop until ``done()`` (30 s at most), then cancel it."""
    task = asyncio.create_task(run())
    try:
        for _ in range(1500):
            if done():
                return
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _shipper(tmp: Path, url: str, ca_file: str) -> Shipper:
    spool = Spool(tmp / "spool", max_bytes=2**20, segment_bytes=8192)
    for i in range(5):
        spool.append(record("n1", i))
    cfg = ShipperConfig(
        enabled=True,
        url=url,
        token=TOKEN,
        ca_file=ca_file,
        state_file=str(tmp / "shipper.json"),
        interval_s=0.05,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
        timeout_s=5,
    )
    return Shipper(spool, cfg, TOKEN)


def _poller(tmp: Path, url: str, **kw: Any) -> ModelPoller:
    node = types.SimpleNamespace(
        models=ModelManager(GRID, "/nonexistent/default.onnx"), record_observers=[]
    )
    cfg = ModelPollerConfig(enabled=True, url=url, dir=str(tmp / "models"), wait_s=0.2)
    return ModelPoller(node, cfg, url, **kw)


def test_shipper_poller_and_publish_verify_the_trainer_against_the_ca(tmp_path: Path, tls) -> None:
    ca = ssl.create_default_context(cafile=tls["ca"])
    pair = {"tls_cert_file": tls["cert"], "tls_key_file": tls["key"]}
    with ServerThread(tmp_path / "data", context=ca, **pair) as srv:
        assert srv.url.startswith("https://")
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            http(srv.url + "/healthz", token=None)  # the system's CAs do not know ours
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            publish(srv.url, TOKEN, onnx_policy("harvest"))
        assert publish(srv.url, TOKEN, onnx_policy("harvest"), ca_file=tls["ca"])["version"] == 1

        # the shipper: nothing leaves without the CA, everything with it
        blind = _shipper(tmp_path / "blind", srv.url, ca_file="")
        asyncio.run(_run_until(blind.run, lambda: blind.retries >= 2, "the blind shipper"))
        assert "certificate verify failed" in blind.last_error and blind.shipped_records == 0
        sh = _shipper(tmp_path / "ok", srv.url, ca_file=tls["ca"])
        asyncio.run(_run_until(sh.run, lambda: sh.shipped_records == 5, "5 records shipped"))
        assert http(srv.url + "/healthz", token=None, context=ca)[2].count(b'"records": 5') == 1

        # the poller: the CA and the token, or no model
        blind_p = _poller(tmp_path / "p1", srv.url, token=TOKEN)
        asyncio.run(_run_until(blind_p.run, lambda: blind_p.last_error, "the blind poller"))
        assert "certificate verify failed" in blind_p.last_error
        no_token = _poller(
            tmp_path / "p2", srv.url, ssl_context=ShipperConfig(ca_file=tls["ca"]).ssl_context()
        )
        asyncio.run(_run_until(no_token.run, lambda: no_token.last_error, "a poller without token"))
        assert no_token.last_error == "HTTP 401" and no_token.active_version is None
        p = _poller(
            tmp_path / "p3",
            srv.url,
            token=TOKEN,
            ssl_context=ShipperConfig(ca_file=tls["ca"]).ssl_context(),
        )
        asyncio.run(_run_until(p.run, lambda: p.active_version == 1, "the model adopted"))
        assert p.models.current.source == "onnx" and p.last_error is None
