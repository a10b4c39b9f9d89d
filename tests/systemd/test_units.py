"""systemd units: ``systemd-analyze verify`` clean; install.sh stages them; the trainer's
sd_notify.

``verify`` refuses a unit whose ExecStart does not exist, and ``/opt/faasrm/venv`` exists only
where install.sh ran: the test verifies copies whose ExecStart is a real executable that runs
this interpreter's faasrm. Where ``systemd-analyze`` is missing, CI installs Debian's ``systemd``
(``tests/conftest.py``'s ``need_tool``); elsewhere the test skips and says so.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.core.features import FEATURE_VERSION

REPO = Path(__file__).resolve().parents[2]
UNITS = ("faasrm-sidecar", "faasrm-trainer")
INSTALLED = "/opt/faasrm/venv/bin/faasrm"


def _verify(tmp_path: Path, text_by_unit: dict[str, str]) -> subprocess.CompletedProcess:
    paths = []
    for unit, text in text_by_unit.items():
        p = tmp_path / f"{unit}.service"
        p.write_text(text)
        paths.append(str(p))
    return subprocess.run(
        ["systemd-analyze", "verify", *paths], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def units(tmp_path: Path, debian_tool: Callable[..., str]) -> dict[str, str]:
    """The units as verify sees them after install.sh: ExecStart at an executable faasrm."""
    debian_tool("systemd-analyze", ["systemd"], "systemd unit check")
    exe = tmp_path / "bin" / "faasrm"
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m sidecar "$@"\n')
    exe.chmod(0o755)
    texts = {u: (REPO / "systemd" / f"{u}.service").read_text() for u in UNITS}
    for text in texts.values():
        assert f"ExecStart={INSTALLED} " in text  # the path install.sh rewrites
    return {u: text.replace(INSTALLED, str(exe)) for u, text in texts.items()}


def test_units_verify_without_warnings(tmp_path: Path, units: dict[str, str]) -> None:
    res = _verify(tmp_path, units)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    for text in units.values():
        for key in (
            "Type=notify",
            "WatchdogSec=",
            "Restart=on-failure",
            "MemoryMax=",
            "ProtectSystem=strict",
            "EnvironmentFile=-",
        ):
            assert key in text
    assert "ReadWritePaths=/sys/fs/cgroup /var/lib/faasrm" in units["faasrm-sidecar"]


def test_verify_output_is_checked(tmp_path: Path, units: dict[str, str]) -> None:
    """The negative control: a bad value exits 0 but complains on stderr, which we catch."""
    bad = {"faasrm-sidecar": units["faasrm-sidecar"].replace("WatchdogSec=10s", "WatchdogSec=soon")}
    res = _verify(tmp_path, bad)
    assert res.returncode == 0 and "Failed to parse" in res.stderr and "soon" in res.stderr


def test_install_sh_stages_units_and_configs(
    tmp_path: Path, debian_tool: Callable[..., str]
) -> None:
    openssl = debian_tool("openssl", ["openssl"], "install.sh's TLS pair")
    dest = tmp_path / "root"
    res = subprocess.run(
        [
            "sh",
            str(REPO / "systemd" / "install.sh"),
            "--role",
            "both",
            "--skip-venv",
            "--prefix",
            "/opt/faasrm-test",
            "--tls-names",
            "DNS:trainer.test,IP:10.0.0.5",
        ],
        env={**os.environ, "DESTDIR": str(dest)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    for u in UNITS:
        text = (dest / "etc/systemd/system" / f"{u}.service").read_text()
        assert "ExecStart=/opt/faasrm-test/venv/bin/faasrm" in text
    assert (dest / "etc/faasrm/sidecar.toml").exists() and (
        dest / "etc/faasrm/trainer.toml"
    ).exists()
    assert "nothing reloaded" in res.stdout
    share = dest / "opt/faasrm-test/share/faasrm"
    for name in ("grafana-dashboard.json", "alerts.yml", "alerts_test.yml"):
        assert (share / name).read_bytes() == (REPO / "systemd/monitoring" / name).read_bytes()
    # the trainer's TLS pair, signed by a private CA the nodes get, keys readable by root only
    tls = dest / "etc/faasrm/tls"
    assert {p.name for p in tls.iterdir()} == {"ca.crt", "ca.key", "trainer.crt", "trainer.key"}
    assert all((tls / k).stat().st_mode & 0o077 == 0 for k in ("ca.key", "trainer.key"))
    check = [openssl, "verify", "-CAfile", str(tls / "ca.crt"), str(tls / "trainer.crt")]
    assert subprocess.run(check, capture_output=True, text=True).stdout.strip().endswith(": OK")
    names = subprocess.run(
        [openssl, "x509", "-in", str(tls / "trainer.crt"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
    ).stdout
    assert "DNS:trainer.test" in names and "IP Address:10.0.0.5" in names
    unit = (dest / "etc/systemd/system/faasrm-trainer.service").read_text()
    assert "LoadCredential=trainer.key:/etc/faasrm/tls/trainer.key" in unit
    # run again: the pair is kept, not replaced
    before = (tls / "trainer.crt").read_bytes()
    subprocess.run(
        ["sh", str(REPO / "systemd" / "install.sh"), "--role", "trainer", "--skip-venv"],
        env={**os.environ, "DESTDIR": str(dest)},
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert (tls / "trainer.crt").read_bytes() == before


def test_trainer_sends_ready_watchdog_stopping(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(sock_path),
        "WATCHDOG_USEC": "400000",
        "FAASRM_TRAINER_TOKEN": "t",
    }
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "trainer",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--set",
            "learner.enabled=false",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "log", "wb"),
    )
    got: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and got.count("WATCHDOG=1") < 3:
            try:
                got.append(sock.recv(4096).decode().split("\n", 1)[0])
            except TimeoutError:
                assert proc.poll() is None, (tmp_path / "log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        while True:
            try:
                got.append(sock.recv(4096).decode().split("\n", 1)[0])
            except TimeoutError:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert got[0] == "READY=1", got
    assert got.count("WATCHDOG=1") >= 3 and got[-1] == "STOPPING=1", got
    logs = [json.loads(line) for line in (tmp_path / "log").read_text().splitlines() if line]
    assert {"trainer listening", "stopping"} <= {rec["msg"] for rec in logs}  # JSON lines


def test_a_wheel_install_carries_and_loads_the_shipped_models(tmp_path: Path) -> None:
    """install.sh pip-installs the project (not editable): the models must travel with it
    (<prefix>/share/faasrm/models) and an empty [model] path must find the grid's model there;
    the debug page travels as package data."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("sidecar", "training", "models"):
        shutil.copytree(REPO / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl")],
        check=True,
        timeout=120,
        cwd=src,
    )
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60
    )
    wheel = next((tmp_path / "whl").glob("faasrm-*.whl"))
    # --ignore-installed: never uninstall the faasrm of the environment running the tests
    subprocess.run(
        [*pip, "install", "--no-deps", "--ignore-installed", "--prefix", str(venv), str(wheel)],
        check=True,
        timeout=120,
    )
    site = next(venv.glob("lib/python3*/site-packages"))
    # the dependencies come from this environment, after the installed package
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz_deps.pth").write_text("\n".join(deps) + "\n")
    probe = (
        "import json, sidecar.models as m; from sidecar.core.grid import ResourceGrid as G; "
        "from importlib import resources; "
        "page = resources.files('sidecar').joinpath('debug_page.html').is_file(); "
        "mm = m.ModelManager(G(0.25, 8, 64.0, 8)); ok = mm.load(); "
        "print(json.dumps([m.__file__, str(mm.path), ok, mm.current.source, page, "
        "mm.last_error]))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=True,
        # a PYTHONPATH naming a source tree (as when testing a checkout) would win over the install
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    module, path, ok, source, page, error = json.loads(out.stdout)
    assert module.startswith(str(venv)), module  # the installed copy, not this source tree
    assert path == str(venv / "share" / "faasrm" / "models" / "invoker.onnx")
    # it loads when trained on this code's feature schema; a model from an older schema is
    # refused with that reason (the rule runs) until it is retrained
    meta = json.loads(Path(path + ".json").read_text())
    if meta["feature_version"] == str(FEATURE_VERSION):
        assert ok and source == "onnx", error
    else:
        assert not ok and source == "fallback" and "feature_version" in error["reason"]
    assert page  # GET /debug/ is served from package data


def test_an_invoker_set_up_as_documented_takes_the_trainer_token_from_sidecar_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/trainer.md puts the trainer's token in /etc/faasrm/sidecar.env (the unit's
    EnvironmentFile) and turns [shipper] on in the installed sidecar.toml: the example config must
    then use $FAASRM_TRAINER_TOKEN, not name a token file nobody writes (the sidecar would refuse
    to start, and restart in a loop, as soon as shipping is on)."""
    from sidecar import config

    unit = (REPO / "systemd" / "faasrm-sidecar.service").read_text()
    assert "EnvironmentFile=-/etc/faasrm/sidecar.env" in unit
    assert "FAASRM_TRAINER_TOKEN=" in (REPO / "docs" / "trainer.md").read_text()
    monkeypatch.setenv("FAASRM_TRAINER_TOKEN", "from-sidecar-env")
    on = {
        "shipper.enabled": True,
        "shipper.url": "https://trainer.example.org:9480",
        "model_poller.enabled": True,
    }
    cfg = config.load(REPO / "sidecar" / "example.toml", on)
    assert cfg.shipper.resolve_token() == "from-sidecar-env"


def _env_file(path: Path) -> dict[str, str]:
    """The variables a unit's EnvironmentFile= sets (KEY=VALUE lines; # comments)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_install_sh_gives_the_trainer_a_root_only_token(
    tmp_path: Path, debian_tool: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``install.sh --role trainer --start`` must start a trainer that has a token (it refuses to
    run without one): install.sh writes one to the unit's EnvironmentFile, readable by root only
    whatever the caller's umask, once (a re-run keeps it); on one host with both units the
    sidecar's env file carries the same token."""
    from training.service import load_config

    debian_tool("openssl", ["openssl"], "install.sh's TLS pair")
    dest = tmp_path / "root"

    def install(root: Path, *args: str) -> None:
        script = shlex.join(["sh", str(REPO / "systemd" / "install.sh"), "--skip-venv", *args])
        subprocess.run(
            ["sh", "-c", f"umask 000 && {script}"],
            env={**os.environ, "DESTDIR": str(root)},
            capture_output=True,
            timeout=60,
            check=True,
        )

    install(dest, "--role", "both", "--tls-names", "DNS:trainer.test")
    etc = dest / "etc/faasrm"
    for name in ("trainer.env", "sidecar.env"):
        st = (etc / name).stat()
        assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid(), name
    token = _env_file(etc / "trainer.env")["FAASRM_TRAINER_TOKEN"]
    assert len(token) >= 32 and int(token, 16)
    assert _env_file(etc / "sidecar.env") == {"FAASRM_TRAINER_TOKEN": token}
    trainer_unit = (dest / "etc/systemd/system/faasrm-trainer.service").read_text()
    assert "EnvironmentFile=-/etc/faasrm/trainer.env" in trainer_unit
    # the installed trainer.toml, with the unit's credentials and environment, starts
    monkeypatch.setenv("FAASRM_TRAINER_TOKEN", token)
    pair = {
        "tls_cert_file": str(etc / "tls/trainer.crt"),
        "tls_key_file": str(etc / "tls/trainer.key"),
    }
    cfg = load_config(etc / "trainer.toml", {**pair, "data_dir": str(tmp_path / "data")})
    assert cfg.resolve_token() == token and cfg.ssl_context() is not None
    install(dest, "--role", "both")
    assert _env_file(etc / "trainer.env")["FAASRM_TRAINER_TOKEN"] == token  # kept
    # an invoker host alone gets the file to paste the trainer's token into, root's only too
    alone = tmp_path / "invoker"
    install(alone, "--role", "sidecar")
    env = alone / "etc/faasrm/sidecar.env"
    assert env.stat().st_mode & 0o777 == 0o600 and _env_file(env) == {}
    assert "FAASRM_TRAINER_TOKEN=" in env.read_text()


PIDS = Path("/sys/fs/cgroup/pids")


def test_the_shipped_model_is_found_with_no_thread_to_spare(tmp_path: Path, v1_root) -> None:
    """The sidecar unit caps the daemon's threads (TasksMax=64) whatever the host's cores. An
    empty [model] path reads each shipped model's grid; an onnxruntime session with its default
    pool wants a thread per core, and on a host with more cores than the cap leaves it fails:
    the grid's model was then never found and the rule fallback ran. Here, in a pids cgroup
    whose budget the process already uses up, the probe must still find invoker.onnx."""
    if not PIDS.is_dir():
        pytest.skip("no v1 pids hierarchy at /sys/fs/cgroup/pids")
    cg = PIDS / f"faasrm-test-{os.getpid()}"
    cg.mkdir()
    probe = (
        "import os, sys\n"
        "import numpy, onnxruntime\n"
        "from sidecar.core.grid import ResourceGrid\n"
        "from sidecar.models import default_model_path\n"
        "cg = sys.argv[1]\n"
        "open(cg + '/cgroup.procs', 'w').write(str(os.getpid()))\n"
        "open(cg + '/pids.max', 'w').write(str(len(os.listdir('/proc/self/task'))))\n"
        "print(default_model_path(ResourceGrid(0.25, 8, 64.0, 8)).name)\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe, str(cg)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    finally:
        cg.rmdir()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "invoker.onnx", out.stderr


def _unit_environment(unit: str) -> dict[str, str]:
    """The variables a unit's Environment= lines set (unquoted KEY=VALUE words)."""
    text = (REPO / "systemd" / f"{unit}.service").read_text()
    words = [
        w
        for line in text.splitlines()
        if line.startswith("Environment=")
        for w in line[12:].split()
    ]
    return dict(w.split("=", 1) for w in words)


@pytest.mark.parametrize(
    ("unit", "modules"),
    [
        ("faasrm-sidecar", "sidecar.daemon, sidecar.models"),
        ("faasrm-trainer", "training.service, training.online"),
    ],
)
def test_a_daemon_starts_no_thread_per_core_under_its_unit(unit: str, modules: str) -> None:
    """Each unit caps its daemon's tasks (TasksMax) whatever the host's cores, but numpy's
    OpenBLAS starts a thread per core (up to 64) when it is imported: on a 64-core host the
    sidecar had used its 64 tasks before its first asyncio.to_thread (container discovery), and
    each of the trainer's ingest workers took 64 more. Under the unit's environment importing
    the daemon's modules must leave the main thread alone."""
    blas = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")  # not the caller's
    env = {k: v for k, v in os.environ.items() if k not in blas} | _unit_environment(unit)
    probe = f"import os, {modules}\nprint(len(os.listdir('/proc/self/task')))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1", (unit, os.cpu_count())


def test_a_rerun_beside_an_own_certificate_makes_no_ca_that_did_not_sign_it(
    tmp_path: Path, debian_tool: Callable[..., str]
) -> None:
    """docs/trainer.md: a pair from your own CA goes in /etc/faasrm/tls. Re-running install.sh
    (an upgrade) then kept the pair but created a private ca.crt beside it, which never signed
    it: a node given that ca.crt ([shipper] ca_file, as the docs say) refuses the trainer."""
    debian_tool("openssl", ["openssl"], "install.sh's TLS pair")
    script = str(REPO / "systemd" / "trainer-tls.sh")
    own = tmp_path / "own-ca"
    subprocess.run(["sh", script, str(own), "DNS:trainer.test"], check=True, capture_output=True)
    dest = tmp_path / "root"
    tls = dest / "etc/faasrm/tls"
    tls.mkdir(parents=True, mode=0o700)
    for name in ("trainer.crt", "trainer.key"):
        shutil.copy2(own / name, tls / name)
    subprocess.run(
        ["sh", str(REPO / "systemd" / "install.sh"), "--role", "trainer", "--skip-venv"],
        env={**os.environ, "DESTDIR": str(dest)},
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert sorted(p.name for p in tls.iterdir()) == ["trainer.crt", "trainer.key"]
    assert (tls / "trainer.crt").read_bytes() == (own / "trainer.crt").read_bytes()
