"""Shared bits of the testbed tests: one machine, real processes, real cgroup v1."""

from __future__ import annotations

import io
from pathlib import Path

from sidecar.core.grid import ResourceGrid
from training.processes import TOKEN
from training.testbed import Testbed

GRID = ResourceGrid(0.25, 8, 64.0, 8)
GRID_OV = {"grid.cpu_unit_cores": GRID.cpu_unit_cores, "grid.mem_unit_mb": GRID.mem_unit_mb}


def publish_fresh_agent(testbed: Testbed, tmp: Path, seed: int = 0) -> int:
    import torch

    from training.export import export
    from training.ppo import Agent
    from training.service import publish

    torch.manual_seed(seed)
    agent = Agent()
    path = tmp / f"agent{seed}.onnx"
    export(agent, path, args={"preset": "sample"}, grid=GRID)
    buf = io.BytesIO()
    torch.save({"agent": agent.state_dict()}, buf)
    return publish(testbed.trainer.url, TOKEN, path, checkpoint=buf.getvalue())["version"]


def cgroup_gone(parent: str) -> bool:
    return not any(
        Path(f"/sys/fs/cgroup/{c}/{parent}").exists() for c in ("cpu", "cpuacct", "memory")
    )


def unread_by_server(client_pid: int, server_port: int) -> int:
    """The most bytes a stopped server on 127.0.0.1:``server_port`` holds unread on one
    connection from ``client_pid``: what the kernel took off the client's hands (/proc/net/tcp's
    rx_queue on the server's side)."""
    import psutil

    ports = {
        c.laddr.port
        for c in psutil.Process(client_pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == server_port
    }
    most = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
        if local == server_port and remote in ports:
            most = max(most, int(fields[4].split(":")[1], 16))
    return most
