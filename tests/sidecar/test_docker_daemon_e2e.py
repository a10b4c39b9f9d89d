"""End to end with Docker: ``faasrm sidecar run`` with ``[docker] enabled`` as a subprocess,
against a real dockerd (docker_env.py: a private one, or a skip saying why), managing an
OpenWhisk-named container whose pause/unpause marks the invocations, as OpenWhisk's invoker does.

Checked: the container is discovered and mapped to ``guest/hello`` with the user's size from
HostConfig; unpause -> a decision (trace in /debug/allocations), limits written to the
container's own cgroup files; pause -> the user's limits back; SIGTERM -> the user's limits.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import Daemon, free_port
from docker_env import DockerEngine, busybox_image, client_for, docker_engine  # noqa: F401
from sidecar_helpers import MB, write_policy

pytestmark = [pytest.mark.docker, pytest.mark.root]  # containers whose cgroups the test writes
ROOT = "/sys/fs/cgroup"
BUSY = "while :; do :; done"


def _config(tmp_path: Path, port: int, base_url: str | None, model: Path) -> Path:
    lines = [
        "log_level = 'info'",
        f"[server]\nport = {port}\nsocket = '{tmp_path / 'sidecar.sock'}'",
        "[grid]\ncpu_unit_cores = 0.25\ncpu_units = 8\nmem_unit_mb = 64.0\nmem_units = 8",
        "[sampler]\ntick_s = 0.1\ndiscover_every_s = 1.0",
        f"[actuation]\nstate_file = '{tmp_path / 'state.json'}'",
        f"[spool]\ndir = '{tmp_path / 'spool'}'",
        f"[model]\npath = '{model}'",
        f"[docker]\nenabled = true\nbase_url = '{base_url or ''}'",
        "[cgroupfs]\nenabled = true\nversion = 1",  # registered after docker, lists nothing
    ]
    p = tmp_path / "sidecar.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


class Files:
    """A docker container's v1 cgroup files (cgroupfs driver: <controller>/docker/<id>)."""

    def __init__(self, cid: str) -> None:
        self.cid = cid

    def read(self, controller: str, name: str) -> int:
        return int(Path(ROOT, controller, "docker", self.cid, name).read_text())

    def limits(self) -> tuple[int, int, int]:
        """(cfs_quota_us, cpu.shares, memory.limit_in_bytes)"""
        return (
            self.read("cpu", "cpu.cfs_quota_us"),
            self.read("cpu", "cpu.shares"),
            self.read("memory", "memory.limit_in_bytes"),
        )


@pytest.fixture
def wsk_container(docker_engine: DockerEngine, busybox_image: str) -> Iterator[Any]:  # noqa: F811
    client = client_for(docker_engine)
    name = f"wsk0_{random.randrange(10**6, 10**7)}_guest_hello"  # unique: dockerd may be shared
    c = client.containers.run(
        busybox_image,
        ["sh", "-c", BUSY],
        name=name,
        detach=True,
        network_mode="none",
        mem_limit=256 * MB,
        cpu_shares=512,
    )
    try:
        c.pause()  # idle, as OpenWhisk keeps a warm container between activations
        yield c
    finally:
        try:
            client.api.remove_container(c.id, force=True)
        finally:
            client.close()


def _wait(pred: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (got := pred()) is not None and got is not False:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_docker_pause_unpause_drive_decisions(
    tmp_path: Path,
    docker_engine: DockerEngine,  # noqa: F811 (the fixture imported above)
    wsk_container: Any,
) -> None:
    if not os.path.isdir(f"{ROOT}/cpu/docker/{wsk_container.id}"):
        pytest.skip("the engine does not use the cgroupfs driver on cgroup v1 here")
    files = Files(wsk_container.id)
    port = free_port()
    model = write_policy(tmp_path / "harvest.onnx", "harvest")
    d = Daemon(_config(tmp_path, port, docker_engine.base_url, model), port, tmp_path / "d.log")
    try:
        ready = d.wait_ready()
        assert ready["model_source"] == "onnx"
        _, view = d.call("/debug/containers")
        (mine,) = [c for c in view["containers"] if c["id"] == wsk_container.id]
        assert (mine["function"], mine["runtime"]) == ("guest/hello", "docker")
        user_cores = mine["user"]["cpu_cores"]
        assert user_cores == pytest.approx(512 * (os.cpu_count() or 1) / 1024)
        assert mine["user"]["mem_bytes"] == 256 * MB
        user = (round(user_cores * 100_000), 512, 256 * MB)
        assert files.limits() == user  # the user's size put in place (quota from the shares)

        def allocations() -> list[dict]:
            _, body = d.call("/debug/allocations?function=guest/hello")
            return body["allocations"]

        def invocation(n: int) -> tuple[dict, tuple[int, int, int]]:
            """unpause ... pause, as the invoker around activation n; returns its trace entry
            and the limits seen while it ran."""
            wsk_container.unpause()
            _wait(lambda: len(allocations()) >= n and allocations()[0], 5, f"decision {n}")
            time.sleep(0.6)  # the busy loop runs under the decision
            during = files.limits()
            wsk_container.pause()
            _wait(lambda: allocations()[0]["outcome"] is not None, 5, f"end of {n}")
            return allocations()[0], during

        first, during = invocation(1)
        assert first["container"] == wsk_container.id and first["kind"] == "user"
        assert first["reason"] == "cpu=first,mem=first"  # the safeguard calibrates first
        assert during == user
        assert first["outcome"] == "success" and first["cpu_peak_cores"] >= 0.3
        assert _wait(lambda: files.limits() == user, 2, "user limits after 1")

        second, during = invocation(2)
        # The busy loop reached its quota in the first run: the safeguard gives it more CPU
        # (accelerated); its memory is barely used: harvested.
        assert second["kind"] in ("harvested", "accelerated"), second
        chosen = second["chosen"]
        assert chosen["mem_bytes"] < 256 * MB and during[2] == chosen["mem_bytes"]  # in place
        assert during[2] >= files.read("memory", "memory.max_usage_in_bytes")  # no OOM risk
        given_back = [r for g in second["give_backs"] for r in g["resources"]]
        if chosen["cpu_cores"] < user_cores:  # a busy loop saturates harvested CPU: given back
            assert "cpu" in given_back and during[0] == user[0], second
        else:
            assert during[0] == round(chosen["cpu_cores"] * 100_000), (second, during)
        assert _wait(lambda: files.limits() == user, 2, "user limits after 2")

        # a third activation left running: SIGTERM must put the user's limits back
        wsk_container.unpause()
        _wait(lambda: len(allocations()) >= 3, 5, "decision 3")
        assert d.stop() == 0
        assert files.limits() == user
        oom = Path(ROOT, "memory", "docker", wsk_container.id, "memory.oom_control").read_text()
        assert "oom_kill 0" in oom  # harvesting never OOM-killed the container
    finally:
        d.stop()
    log = (tmp_path / "d.log").read_text()
    assert '"level": "error"' not in log, log[-3000:]
