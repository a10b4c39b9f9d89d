"""Configuration: one typed tree from TOML, strict keys, flag overrides (pure)."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import config
from sidecar.config import Config, ConfigError, from_dict, parse_override

EXAMPLE = Path(__file__).resolve().parents[2] / "sidecar" / "example.toml"


def test_defaults_and_core_configs() -> None:
    cfg = config.load(None)
    assert cfg == Config()
    assert cfg.server.host == "127.0.0.1"
    assert cfg.server.socket == "/run/faasrm/sidecar.sock" and not cfg.server.tcp_hooks
    assert cfg.grid.n == 64 and cfg.grid.cpu_unit_cores == 1.0
    assert cfg.safeguard.threshold == 0.9
    assert cfg.reward.failure_penalty == 5.0
    assert cfg.node  # hostname when node_id is empty


def test_example_config_loads() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.grid.cpu_unit_cores == 0.25 and cfg.grid.max_cores == 2.0
    assert cfg.cgroupfs.parent == "faasrm" and cfg.model.rule == "user"
    (c,) = cfg.cgroupfs.containers
    assert (c.path, c.function, c.cpu_cores, c.mem_mb) == (
        "faasrm/thumbnail@1",
        "thumbnail",
        1.0,
        256.0,
    )


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("bogus = 1", "unknown key 'bogus'"),
        ("[sampler]\ntick = 0.1", "unknown key 'tick' in [sampler]"),
        ("[nope]\nx = 1", "unknown key 'nope'"),
        ("[sampler]\ntick_s = 'fast'", "sampler.tick_s: expected a number"),
        ("[server]\nport = 1.5", "server.port: expected an integer"),
        ("[actuation]\nrestore_on_end = 1", "actuation.restore_on_end: expected true or false"),
        ("[sampler]\ntick_s = 0", "sampler.tick_s 0.0 outside"),
        ("[grid]\ncpu_unit_cores = -1", "grid: unit sizes must be positive"),
        ("[safeguard]\nthreshold = 1.5", "safeguard.threshold"),
        (
            "[[cgroupfs.containers]]\nfunction = 'x'",
            "missing required key cgroupfs.containers[0].path",
        ),
        (
            "[[cgroupfs.containers]]\npath = 'a'\nsize = 3",
            "unknown key 'size' in [cgroupfs.containers[0]]",
        ),
        (
            "[[cgroupfs.containers]]\npath = 'a'\n[[cgroupfs.containers]]\npath = 'a/'",
            "listed twice",
        ),
        ("log_level = 'loud'", "log_level"),
        ("[grid]\nmem_units = inf", "expected an integer"),
        ("[safeguard]\nmem_headroom_mb = nan", "expected a finite number"),
        ("[safeguard]\nmem_margin_units = 1.5", "safeguard.mem_margin_units 1.5 outside [0, 1]"),
        ("[safeguard]\nmem_harvest_after = -1", "safeguard.mem_harvest_after must be >= 0"),
        ("[actuation]\nprofiles_save_s = 0.5", "actuation.profiles_save_s 0.5 must be >= 1"),
        ("[safeguard]\nmem_margin_sd = -0.5", "safeguard.mem_margin_sd must be >= 0"),
        ("[safeguard]\nmem_harvest_after = 2.5", "expected an integer"),
        ("[model]\nrule = 'largest'", "model.rule 'largest' is not one of user, smallest"),
        (
            "[actuation]\nv1_memory_harvest = 'both'",
            "actuation.v1_memory_harvest 'both' is not one of hard, hold, soft",
        ),
        ("[actuation]\nthrottle_target = 1.5", "actuation.throttle_target 1.5 outside [0, 1]"),
        (
            "[[actuation.harvest_periods]]\nfunction = 'f'\ncpu_period_us = 100",
            "actuation.harvest_periods[0].cpu_period_us 100 outside 1000..1000000",
        ),
        (
            "[[actuation.harvest_periods]]\nfunction = 'f'\ncpu_period_us = 200000\n"
            "[[actuation.harvest_periods]]\nfunction = 'f'\ncpu_period_us = 500000",
            "actuation.harvest_periods[1].function must be set, once per function",
        ),
        ("[server]\ntcp_hooks = true", "server.tcp_hooks needs server.token_file or server.token"),
        (f"[server]\nsocket = '/{'s' * 107}'", "server.socket is longer than 107 bytes"),
        ("node_id = 'a b'", "node_id 'a b' is not 1-128 characters"),
        ('node_id = "n1\\n"', "node_id 'n1\\n' is not 1-128 characters"),
        ("[shipper]\ntimeout_s = 0", "shipper.timeout_s 0.0 must be > 0"),
        ("[shipper]\ntimeout_s = -1", "shipper.timeout_s -1.0 must be > 0"),
        ("[model]\nmax_runtime_failures = 0", "model.max_runtime_failures 0 must be >= 1"),
        ("[model_poller]\nslowdown_rfet = 0", "model_poller.slowdown_rfet 0.0 must be >= 1"),
        ("[model_poller]\nslowdown_rfet = 0.5", "model_poller.slowdown_rfet 0.5 must be >= 1"),
        (
            "[cgroupfs]\ndefault_cpu_cores = -1",
            "cgroupfs.default_cpu_cores -1.0 must be 0 (the cgroup's own) or >= 0.01",
        ),
        (
            "[cgroupfs]\ndefault_cpu_cores = 0.001",
            "cgroupfs.default_cpu_cores 0.001 must be 0 (the cgroup's own) or >= 0.01",
        ),
        (
            "[cgroupfs]\ndefault_mem_mb = -1",
            "cgroupfs.default_mem_mb -1.0 must be 0 (the cgroup's own) or >= 16.0",
        ),
        (  # the safeguard's headroom is the floor, as for a hook and a listed container
            "[cgroupfs]\ndefault_mem_mb = 8",
            "cgroupfs.default_mem_mb 8.0 must be 0 (the cgroup's own) or >= 16.0",
        ),
        ("[reward]\nslowdown_weight = -1", "reward.slowdown_weight -1.0 must be >= 0"),
        ("[reward]\nfailure_penalty = -5", "reward.failure_penalty -5.0 must be >= 0"),
        ("[reward]\ndelay_floor_s = -1", "reward.delay_floor_s -1.0 must be >= 0"),
        ("[reward]\nclip = 0", "reward.clip 0.0 must be > 0"),
        (
            "[[cgroupfs.containers]]\npath = 'a'\ncpu_cores = 0.001",
            "cgroupfs.containers[0].cpu_cores 0.001 must be 0 (the cgroup's own) or >= 0.01",
        ),
        (
            "[safeguard]\nmem_headroom_mb = 0\n[[cgroupfs.containers]]\npath = 'a'\nmem_mb = 2",
            "cgroupfs.containers[0].mem_mb 2.0 must be 0 (the cgroup's own) or >= 4.0",
        ),
        (  # the default safeguard.mem_headroom_mb (16) is the floor, as for a hook
            "[[cgroupfs.containers]]\npath = 'a'\nmem_mb = 8",
            "cgroupfs.containers[0].mem_mb 8.0 must be 0 (the cgroup's own) or >= 16.0",
        ),
        (
            "[[cgroupfs.containers]]\npath = 'a'\ncpu_cores = -1",
            "cgroupfs.containers[0].cpu_cores -1.0 must be 0 (the cgroup's own) or >= 0.01",
        ),
        (
            "[[cgroupfs.containers]]\npath = 'a'\ncpu_weight = 0",
            "cgroupfs.containers[0].cpu_weight 0 outside 1..10000",
        ),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, toml: str, needle: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        config.load(p)
    assert needle in str(exc.value) and str(p) in str(exc.value)


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[server\nport=1")
    with pytest.raises(ConfigError):
        config.load(tmp_path / "bad.toml")


def test_overrides_win_and_are_typed(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[server]\nport = 1234\n[sampler]\ntick_s = 0.2\n")
    overrides = dict(
        parse_override(s)
        for s in ["sampler.tick_s=0.05", "model.path=/x/y.onnx", "boundaries.infer=true"]
    )
    overrides["server.port"] = 4321
    cfg = config.load(p, overrides)
    assert cfg.sampler.tick_s == 0.05 and cfg.server.port == 4321
    assert cfg.model.path == "/x/y.onnx" and cfg.boundaries.infer is True
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        config.load(p, {"sampler.nope": 1})
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="log_level: expected a string"):
        config.load(p, {"log_level.x": 1})
    with pytest.raises(ConfigError, match="is not a table"):
        config.load(p, {"server.port.x": 1})


def test_memory_margin_follows_the_memory_mode_unless_set(tmp_path: Path) -> None:
    """A quarter unit under the hold; the reference's whole unit on a ``hard`` host, where every
    miss is a kill; whatever the operator wrote, in the file or as a flag."""
    assert from_dict({}).safeguard.mem_margin_units == 0.25
    for mode, margin in (("hold", 0.25), ("soft", 0.25), ("hard", 1.0)):
        cfg = from_dict({"actuation": {"v1_memory_harvest": mode}})
        assert cfg.safeguard.mem_margin_units == margin, mode
    p = tmp_path / "hard.toml"
    p.write_text("[actuation]\nv1_memory_harvest = 'hard'\n[safeguard]\nmem_margin_units = 0.5\n")
    assert config.load(p).safeguard.mem_margin_units == 0.5
    assert config.load(p, {"safeguard.mem_margin_units": 0.25}).safeguard.mem_margin_units == 0.25
    hard = config.load(None, {"actuation.v1_memory_harvest": "hard"})
    assert hard.safeguard.mem_margin_units == 1.0 and hard.safeguard.mem_headroom_mb == 16.0
    with pytest.raises(ConfigError, match="safeguard"):
        from_dict({"actuation": {"v1_memory_harvest": "hard"}, "safeguard": 3})


def test_cli_flags_map_to_config_keys(tmp_path: Path) -> None:
    from sidecar.cli import _sidecar_overrides, build_parser

    args = build_parser().parse_args(
        [
            "sidecar",
            "run",
            "--config",
            "c.toml",
            "--port",
            "9",
            "--model",
            "m.onnx",
            "--state-file",
            "s.json",
            "--set",
            "grid.cpu_unit_cores=0.5",
        ]
    )
    assert _sidecar_overrides(args) == {
        "server.port": 9,
        "model.path": "m.onnx",
        "actuation.state_file": "s.json",
        "grid.cpu_unit_cores": 0.5,
    }


def test_a_trainer_ca_file_needs_https_urls_and_a_readable_file() -> None:
    sh = {"enabled": True, "url": "http://trainer:9480", "ca_file": "/etc/faasrm/trainer-ca.crt"}
    with pytest.raises(ConfigError, match="shipper.ca_file is set but the shipper url is http"):
        from_dict({"shipper": sh})
    with pytest.raises(ConfigError, match="model_poller url is http"):
        from_dict(
            {
                "shipper": {**sh, "enabled": False, "url": "https://trainer:9480"},
                "model_poller": {"enabled": True, "url": "http://trainer:9480"},
            }
        )
    cfg = from_dict(
        {"shipper": {**sh, "url": "https://trainer:9480"}, "model_poller": {"enabled": True}}
    )
    with pytest.raises(ConfigError, match="shipper.ca_file /etc/faasrm/trainer-ca.crt"):
        cfg.shipper.ssl_context()  # named when the daemon builds its clients
    https = {**sh, "url": "https://trainer:9480", "ca_file": ""}
    assert from_dict({"shipper": https}).shipper.ssl_context().verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("shipper", "poller"),
    [("http://trainer:9480", ""), ("https://trainer:9480", "http://10.0.0.5:9480")],
)
def test_a_trainer_url_off_this_host_needs_https_or_allow_plaintext(
    shipper: str, poller: str
) -> None:
    """The bearer token (and the records) would cross the network in clear text: refused unless
    the operator says the network is trusted."""
    sections = {
        "shipper": {"enabled": True, "url": shipper},
        "model_poller": {"enabled": True, "url": poller},
    }
    with pytest.raises(ConfigError, match=r"plain http to a host that is not loopback.*https://"):
        from_dict(sections)
    allowed = {**sections, "shipper": {**sections["shipper"], "allow_plaintext": True}}
    assert from_dict(allowed).shipper.allow_plaintext


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9480", "http://127.3.2.1:9480", "http://[::1]:9480", "http://localhost"],
)
def test_a_trainer_on_this_host_may_be_plain_http(url: str) -> None:
    cfg = from_dict({"shipper": {"enabled": True, "url": url}, "model_poller": {"enabled": True}})
    assert cfg.shipper.url == url and not cfg.shipper.allow_plaintext


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "invoker.example.org", ""])
def test_hooks_over_tcp_off_this_host_need_allow_plaintext(host: str) -> None:
    """The sidecar's TCP listener has no TLS: the hooks' bearer token would cross the network in
    clear text, so it is refused unless the operator says the network is trusted (as the
    trainer's own allow_plaintext)."""
    server = {"host": host, "tcp_hooks": True, "token": "s3cret"}
    with pytest.raises(ConfigError, match=r"server.tcp_hooks on server.host .* clear text"):
        from_dict({"server": server})
    assert from_dict({"server": {**server, "allow_plaintext": True}}).server.allow_plaintext
    assert not from_dict({"server": {"host": host}}).server.tcp_hooks  # read-only endpoints


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_hooks_over_tcp_on_this_host_need_no_allow_plaintext(host: str) -> None:
    cfg = from_dict({"server": {"host": host, "tcp_hooks": True, "token": "s3cret"}})
    assert cfg.server.tcp_hooks and not cfg.server.allow_plaintext


def test_a_hostname_the_trainer_would_refuse_as_node_id_is_a_config_error() -> None:
    """Without ``node_id`` the hostname is the node's id: load refuses one the trainer would."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) for a hostname of its own")
    code = (
        "import socket, sys\n"
        "socket.sethostname('bad_host!')\n"
        "from sidecar import config\n"
        "config.load(None)\n"
    )
    res = subprocess.run(
        ["unshare", "--uts", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(config.__file__).parents[1])},
    )
    if "sethostname" in res.stderr or "unshare:" in res.stderr:
        pytest.skip(f"cannot set a hostname in a new UTS namespace: {res.stderr.strip()}")
    assert "ConfigError: config: node_id 'bad_host!' (the hostname" in res.stderr, res


def test_an_empty_token_file_is_a_config_error(tmp_path: Path) -> None:
    """An empty token file used to resolve to no token: hooks over TCP were then refused with a
    403 saying to turn on the tcp_hooks that were on, and the shipper sent ``Bearer `` for ever."""
    empty = tmp_path / "token"
    empty.write_text("\n")
    cfg = config.load(
        None,
        {
            "server.tcp_hooks": True,
            "server.token_file": str(empty),
            "shipper.token_file": str(empty),
        },
    )
    with pytest.raises(ConfigError, match=rf"server.token_file {empty} is empty"):
        cfg.server.resolve_token()
    with pytest.raises(ConfigError, match=rf"shipper.token_file {empty} is empty"):
        cfg.shipper.resolve_token()
    empty.write_text("s3cret\n")
    assert cfg.server.resolve_token() == cfg.shipper.resolve_token() == "s3cret"
