"""The deployment's monitoring assets (``systemd/monitoring/``) checked with Prometheus's own tool
(Debian's ``promtool``) and against the live ``/metrics`` of a running sidecar and trainer:

* the alert rules pass ``promtool check rules`` and their unit tests (``promtool test rules``);
* the Grafana dashboard has the datasource and node variables, and every expression in it parses;
* every metric the dashboard and the rules name is one the sidecar or the trainer exports;
* both ``/metrics`` pass ``promtool check metrics``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "systemd" / "monitoring"
sys.path.insert(0, str(REPO / "tests" / "sidecar"))
from daemon_helpers import Daemon, free_port  # noqa: E402
from sidecar_helpers import v2_container, write_policy  # noqa: E402

METRIC = re.compile(r"\bfaasrm_[a-z0-9_]+\b")
PROMETHEUS_OWN = {"up"}  # the rules' only metric Prometheus itself writes


@pytest.fixture(scope="module")
def promtool(debian_tool) -> str:
    return debian_tool("promtool", ["prometheus"], "the promtool tests")


def _promtool(promtool: str, *args: str, stdin: str | None = None) -> str:
    res = subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=120, cwd=MONITORING
    )
    assert res.returncode == 0, f"promtool {' '.join(args)}:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def _rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def _panel_exprs(dash: dict) -> list[tuple[str, str]]:
    return [
        (p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]
    ]


def test_alert_rules_pass_promtool_check_and_their_unit_tests(promtool: str) -> None:
    out = _promtool(promtool, "check", "rules", "alerts.yml")
    assert f"SUCCESS: {len(_rules())} rules found" in out
    assert "SUCCESS" in _promtool(promtool, "test", "rules", "alerts_test.yml")
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "alerts_test.yml").read_text()))
    assert tested == {r["alert"] for r in _rules()}  # every alert has a unit test


def test_dashboard_variables_and_every_expression_parses(promtool: str, tmp_path: Path) -> None:
    dash = _dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["node"]["type"] == "query" and variables["node"]["multi"]
    assert "label_values(faasrm_build_info, instance)" in variables["node"]["definition"]
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["schemaVersion"] >= 36
    for p in panels:
        assert p["datasource"] == ds and all(t["datasource"] == ds for t in p["targets"]), p
    # the sidecar panels follow the node variable
    sidecar = [e for _, e in _panel_exprs(dash) if "faasrm_trainer_" not in e]
    assert all('instance=~"$node"' in e for e in sidecar)
    # promtool parses them as recording rules, Grafana's variables replaced by what they expand to
    rules = [
        {
            "record": f"faasrm:panel_{i}",
            "expr": e.replace("$__rate_interval", "1m").replace("$node", ".*"),
        }
        for i, (_, e) in enumerate(_panel_exprs(dash))
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in _promtool(promtool, "check", "rules", str(path))


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The /metrics text of a running sidecar (over a v2 cgroup tree, one invocation decided)
    and of a running trainer, as a user starts them."""
    tmp = tmp_path_factory.mktemp("live")
    root = tmp / "cgroup"
    (root / "faasrm").mkdir(parents=True)
    for name in ("resize@1", "thumb@1"):
        v2_container(root / "faasrm", name)
    sidecar_port, trainer_port = free_port(), free_port()
    cfg = tmp / "sidecar.toml"
    cfg.write_text(
        f"[server]\nport = {sidecar_port}\nsocket = '{tmp / 'sidecar.sock'}'\n"
        "[grid]\ncpu_unit_cores = 0.25\n"
        f"[actuation]\nstate_file = '{tmp / 'state.json'}'\n[spool]\ndir = '{tmp / 'spool'}'\n"
        f"[model]\npath = '{write_policy(tmp / 'p.onnx')}'\n"
        f"[cgroupfs]\nroot = '{root}'\nversion = 2\nparent = 'faasrm'\n"
        "default_cpu_cores = 2.0\ndefault_mem_mb = 512.0\n"
    )
    trainer = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "trainer", "serve", "--port", str(trainer_port)]
        + ["--data-dir", str(tmp / "trainer"), "--set", "learner.enabled=false"],
        env={**os.environ, "FAASRM_TRAINER_TOKEN": "t"},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "trainer.log", "wb"),
    )
    sidecar = Daemon(cfg, sidecar_port, tmp / "sidecar.log")
    try:
        sidecar.wait_ready()
        start = {"container": "faasrm/resize@1", "function": "resize"}
        status, inv = sidecar.call("/v1/invocations", start)
        assert status == 200, inv
        assert sidecar.call(f"/v1/invocations/{inv['invocation']}/end", {})[0] == 200
        texts = {"sidecar": _get(sidecar.url("/metrics"))}
        texts["trainer"] = _get(f"http://127.0.0.1:{trainer_port}/metrics", wait_s=60)
        yield texts
    finally:
        sidecar.stop()
        trainer.send_signal(signal.SIGTERM)
        try:
            trainer.wait(timeout=20)
        except subprocess.TimeoutExpired:
            trainer.kill()
            trainer.wait(timeout=10)


def _get(url: str, wait_s: float = 10.0) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _exported(text: str) -> set[str]:
    """Every series name the exposition can carry, from its TYPE lines (a labelled counter with
    no child yet still has its TYPE) and its samples."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
            names.update(name + s for s in suffixes)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_metric_of_the_dashboard_and_the_rules_is_exported(live_metrics) -> None:
    exported = _exported(live_metrics["sidecar"]) | _exported(live_metrics["trainer"])
    assert "faasrm_harvested_invocations_total" in exported  # labelled: from its TYPE line
    assert any(n.startswith("faasrm_trainer_") for n in _exported(live_metrics["trainer"]))
    used = {}
    for title, expr in _panel_exprs(_dashboard()):
        for name in METRIC.findall(expr):
            used.setdefault(name, f"dashboard panel {title!r}")
    for v in _dashboard()["templating"]["list"]:
        for name in METRIC.findall(v.get("definition", "")):
            used.setdefault(name, f"dashboard variable {v['name']}")
    for rule in _rules():
        names = set(re.findall(r"\b[a-z_][a-z0-9_]*\b(?=\s*[{\[])", rule["expr"]))
        assert names - PROMETHEUS_OWN <= set(METRIC.findall(rule["expr"])), rule["alert"]
        for name in METRIC.findall(rule["expr"]):
            used.setdefault(name, f"alert {rule['alert']}")
    missing = {name: where for name, where in used.items() if name not in exported}
    assert not missing, f"not exported by the sidecar or the trainer: {missing}"
    assert len(used) >= 30  # the check looked at something


def test_both_metrics_endpoints_pass_promtool_check_metrics(promtool: str, live_metrics) -> None:
    for who, text in live_metrics.items():
        assert "faasrm_" in text, who
        _promtool(promtool, "check", "metrics", stdin=text)
