"""Who may resize containers (issue 15.6): the hooks are served on a unix socket (mode 0660,
``[server] socket_group``); over TCP only the read-only endpoints answer, unless ``tcp_hooks``
and a bearer token. A real daemon over a real v1 cgroup, called by root and by an unprivileged
process (uid 65534, gid 65534)."""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import Daemon, free_port, write_config
from sidecar_helpers import write_policy

from sidecar.durable import private_dir

pytest.importorskip("onnxruntime")

NOBODY = 65534
CLIENT = r"""
import errno, http.client, json, socket, sys
sock_path, port, body = sys.argv[1], int(sys.argv[2]), sys.argv[3]
headers = {"Content-Type": "application/json"}
if len(sys.argv) > 4:
    headers["Authorization"] = "Bearer " + sys.argv[4]
out = {}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sock_path)
    conn = http.client.HTTPConnection("localhost", timeout=10)
    conn.sock = s
    conn.request("POST", "/v1/invocations", body, headers)
    r = conn.getresponse()
    out["unix"] = [r.status, json.loads(r.read())]
except OSError as exc:
    out["unix"] = errno.errorcode.get(exc.errno, str(exc))
for method, path, data in (("POST", "/v1/invocations", body), ("GET", "/healthz", None)):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, data, headers)
    r = c.getresponse()
    out["tcp_" + method] = [r.status, json.loads(r.read())]
print(json.dumps(out))
"""


def _drop_privileges() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def as_nobody(socket_path: str, port: int, body: dict, token: str = "") -> dict:
    """Run the client as uid/gid 65534 with an interpreter that user may execute."""
    for python in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"):
        args = [python, "-I", "-c", CLIENT, socket_path, str(port), json.dumps(body)]
        try:
            res = subprocess.run(
                args + ([token] if token else []),
                capture_output=True,
                text=True,
                timeout=30,
                preexec_fn=_drop_privileges,  # noqa: PLW1509 (no threads in this test)
            )
        except (PermissionError, FileNotFoundError):
            continue  # e.g. a venv under /root: not executable by uid 65534
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)
    pytest.skip("no python interpreter that uid 65534 may execute")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory anyone may traverse (unlike pytest's tmp_path), so that only the socket's
    own mode decides who can connect."""
    d = Path(tempfile.mkdtemp(prefix="faasrm-sock-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _daemon(tmp_path: Path, box, sock: Path, server: str = "") -> tuple[Daemon, int]:
    port = free_port()
    cfg = write_config(
        tmp_path,
        port,
        {box.rel: ("fs", 1.0, 256)},
        write_policy(tmp_path / "h.onnx", "harvest"),
        server=f"socket = '{sock}'\n{server}",
    )
    return Daemon(cfg, port, tmp_path / "daemon.log"), port


def _start_end(d: Daemon, rel: str) -> dict:
    status, s = d.call("/v1/invocations", {"container": rel})
    assert status == 200, s
    assert d.call(f"/v1/invocations/{s['invocation']}/end", {})[0] == 200
    return s


def test_only_root_can_call_the_hooks_by_default(tmp_path: Path, boxes, sock_dir: Path) -> None:
    box = boxes("s@1")
    sock = sock_dir / "run" / "sidecar.sock"  # its directory is created by the daemon
    d, port = _daemon(tmp_path, box, sock)
    try:
        d.wait_ready()
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (0, 0)
        quota = box.quota_cores()
        shrink = {"container": box.rel, "user": {"cpu_cores": 0.01, "mem_mb": 20}}
        got = as_nobody(str(sock), port, shrink)
        assert got["unix"] == "EACCES", got
        status, body = got["tcp_POST"]
        assert status == 403 and str(sock) in body["error"], got
        assert got["tcp_GET"][0] == 200, got  # the read-only endpoints stay open on TCP
        assert box.quota_cores() == quota  # nothing was resized
        assert _start_end(d, box.rel)["applied"]  # root can, on the socket
    finally:
        assert d.stop() == 0
    assert not sock.exists()  # removed at exit


def test_the_socket_group_and_the_tcp_opt_in(tmp_path: Path, boxes, sock_dir: Path) -> None:
    """The positive control of the test above: uid 65534 in the socket's group can call the
    hooks; with ``tcp_hooks`` a POST over TCP needs the token."""
    box = boxes("g@1")
    sock = sock_dir / "sidecar.sock"
    group = grp.getgrgid(NOBODY).gr_name
    server = f"socket_group = '{group}'\ntcp_hooks = true\ntoken = 'tcp-secret'"
    d, port = _daemon(tmp_path, box, sock, server)
    try:
        d.wait_ready()
        assert sock.stat().st_gid == NOBODY
        got = as_nobody(str(sock), port, {"container": box.rel})
        status, started = got["unix"]
        assert status == 200 and started["applied"], got
        assert d.call(f"/v1/invocations/{started['invocation']}/end", {})[0] == 200
        assert got["tcp_POST"][0] == 401, got  # the opt-in without the token
        got = as_nobody("/nonexistent", port, {"container": box.rel}, token="wrong")
        assert got["tcp_POST"][0] == 401, got
        got = as_nobody("/nonexistent", port, {"container": box.rel}, token="tcp-secret")
        status, started = got["tcp_POST"]
        assert status == 200, got
        assert d.call(f"/v1/invocations/{started['invocation']}/end", {})[0] == 200
    finally:
        assert d.stop() == 0


def test_a_socket_group_that_does_not_exist_is_a_start_up_error(
    tmp_path: Path, boxes, sock_dir: Path
) -> None:
    box = boxes("e@1")
    sock = sock_dir / "sidecar.sock"
    d, _ = _daemon(tmp_path, box, sock, "socket_group = 'faasrm-no-such-group'")
    assert d.proc.wait(timeout=60) == 2
    err = (tmp_path / "daemon.log").read_text()
    assert "server.socket_group 'faasrm-no-such-group': no such group" in err, err
    assert not sock.exists()


def test_state_dirs_another_user_could_write_are_refused(
    tmp_path: Path, boxes, sock_dir: Path
) -> None:
    """The daemon restores limits from its state file and ships or loads what its spool and
    model directories hold: a directory another user can write (or owns) would let that user
    plant them. Such a directory is a start-up error; one the daemon creates is 0750 whatever
    the umask."""
    box = boxes("w@1")
    spool = tmp_path / "spool"
    spool.mkdir()
    for mode, owner in ((0o777, 0), (0o755, NOBODY)):
        spool.chmod(mode)
        os.chown(spool, owner, owner)
        d, _ = _daemon(tmp_path, box, sock_dir / "sidecar.sock")
        try:
            assert d.proc.wait(timeout=60) == 2
        finally:
            d.stop()
        err = (tmp_path / "daemon.log").read_text()
        assert f"spool.dir: {spool}" in err and ("writable" in err or "owned" in err), err
        assert not (tmp_path / "state.json").exists()  # refused before anything was read
    spool.rmdir()
    old = os.umask(0)
    try:
        d, _ = _daemon(tmp_path, box, sock_dir / "sidecar.sock")
    finally:
        os.umask(old)
    try:
        d.wait_ready()
        assert stat.S_IMODE(spool.stat().st_mode) == 0o750
    finally:
        assert d.stop() == 0


def test_a_state_dir_under_a_parent_another_user_could_write_is_refused(tmp_path: Path) -> None:
    """Whoever can write a parent can rename the state directory away and put their own in its
    place: every ancestor must be root's (or ours) and not writable by every user, unless
    sticky (as /tmp) with the component below it ours; the error names the ancestor."""
    shared = tmp_path / "shared"
    spool = shared / "run" / "spool"
    spool.mkdir(parents=True)
    for mode, owner, why in (
        (0o777, 0, "writable by every user"),
        (0o755, NOBODY, f"owned by uid {NOBODY}"),
        (0o1777, NOBODY, f"owned by uid {NOBODY}"),
    ):
        shared.chmod(mode)
        os.chown(shared, owner, owner)
        with pytest.raises(PermissionError, match=re.escape(f"ancestor {shared} is {why}")):
            private_dir(spool)
        with pytest.raises(PermissionError, match=re.escape(f"ancestor {shared} is {why}")):
            private_dir(shared / "new")  # created first, then refused
    os.chown(shared, 0, 0)
    shared.chmod(0o1777)  # as /tmp: sticky, the directory below it root's
    private_dir(spool)
    os.chown(spool.parent, NOBODY, NOBODY)  # below the sticky one: another user's
    with pytest.raises(PermissionError, match=re.escape(f"ancestor {spool.parent} is owned")):
        private_dir(spool)


def test_a_port_or_socket_in_use_is_a_one_line_error_and_exit_code_2(
    tmp_path: Path, boxes, sock_dir: Path
) -> None:
    """As a config error: a TCP port in use was a traceback and exit code 1 (which a unit's
    restart policy cannot tell from a crash); the listed container stays at its user's size."""
    box = boxes("p@1")
    sock = sock_dir / "sidecar.sock"
    policy = write_policy(tmp_path / "h.onnx", "harvest")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = write_config(
            tmp_path, port, {box.rel: ("fs", 1.0, 256)}, policy, server=f"socket = '{sock}'"
        )
        d = Daemon(cfg, port, tmp_path / "daemon.log")
        assert d.proc.wait(timeout=60) == 2
    err = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in err, err
    assert f"server.port {port} on server.host '127.0.0.1': Address already in use" in err, err
    assert not sock.exists() and box.quota_cores() == 1.0  # the configured user's size
    port = free_port()
    cfg = write_config(
        tmp_path, port, {box.rel: ("fs", 1.0, 256)}, policy, server=f"socket = '{sock}'"
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(sock))
        other.listen()
        d = Daemon(cfg, port, tmp_path / "daemon2.log")
        assert d.proc.wait(timeout=60) == 2
    err = (tmp_path / "daemon2.log").read_text()
    assert "Traceback" not in err, err
    assert f"server.socket {sock} is in use by another process" in err, err
