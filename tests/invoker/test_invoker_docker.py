"""The local invoker's Docker containers on a real dockerd (tests/sidecar/docker_env.py: a private
one, or a skip saying why): real functions in real containers, their cgroups at the user's size,
an OOM kill detected and the container started again, nothing left after stop(); and
``faasrm bench real --runtime docker`` end to end with the sidecar's Docker runtime."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sidecar.dockerd import DockerEngine
from sidecar.runtimes.docker import parse_container_name, user_size
from sidecar.units import MB
from training.invoker.docker_container import leftovers
from training.invoker.functions import BY_NAME
from training.invoker.invoker import Arrival, Containers, Invoker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sidecar"))  # docker_env's home
from docker_env import docker_engine  # noqa: E402, F401 (the session's engine fixture)

pytestmark = [pytest.mark.docker, pytest.mark.root]  # containers whose cgroups the test writes
REPO = Path(__file__).resolve().parents[2]


def test_docker_containers_run_oom_restart_and_cleanup(
    docker_engine: DockerEngine,  # noqa: F811
) -> None:
    parent = f"faasrm-test-docker-{uuid.uuid4().hex[:8]}"
    specs = [BY_NAME["pyloop"], BY_NAME["memhog"]]
    containers = Containers(parent, specs, engine=docker_engine)
    invs = [
        Arrival(i, 0.3 * i, specs[i % 2].name, specs[i % 2].input_size((i % 4) / 4))
        for i in range(8)
    ]
    seen: dict = {}

    async def main() -> tuple:
        try:
            await containers.start(warm=False)
            client = docker_engine.client()
            try:
                for c in containers.values():
                    attrs = client.api.inspect_container(c.id)
                    seen[c.name] = (
                        c.docker_name,
                        c.id,
                        c.cg.paths,
                        c.cg.read_limits(),
                        attrs["HostConfig"],
                    )
            finally:
                client.close()
            records = await Invoker(containers).replay(invs)
            memhog = containers["memhog"]
            oom = await memhog.run(2 * memhog.user_mem_mb)  # MB to touch: twice its limit
            after = await memhog.run(memhog.spec.input_size(0.2))
            return records, oom, after, memhog.oom_kills(), memhog.limits()
        finally:
            await containers.stop()

    records, oom, after, ooms, limits_after = asyncio.run(main())
    assert sorted(r.idx for r in records) == list(range(8))
    assert all(r.outcome == "success" and r.exec_s > 0 for r in records), records
    for spec in specs:
        name, cid, paths, limits, host_config = seen[spec.name]
        user = containers[spec.name].user_limits
        assert (limits.cpu_quota_cores, limits.cpu_weight, limits.mem_limit_bytes) == (
            user.cpu_quota_cores,
            user.cpu_weight,
            user.mem_limit_bytes,
        )  # its cgroup files
        assert all(cid in p for p in paths)
        # what the sidecar's Docker runtime makes of it: the function and the user's size
        assert parse_container_name(name).function == f"guest/{spec.name}"
        size = user_size(
            host_config, cores_per_share=2 / 1024, host_cpus=64, host_mem_bytes=1 << 40
        )
        assert (size.cpu_cores, size.mem_bytes) == (user.cpu_quota_cores, spec.mem_mb * MB)
    assert oom[1] == "oom" and ooms == 1, oom
    assert after[1] == "success", after  # the same container, started again
    assert limits_after is not None and limits_after.mem_limit_bytes == 512 * MB
    assert leftovers(docker_engine, parent) == []
    assert not any(os.path.exists(p) for v in seen.values() for p in v[2])  # cgroups gone


def test_bench_real_runtime_docker_with_the_sidecar(
    tmp_path: Path,
    docker_engine: DockerEngine,  # noqa: F811
) -> None:
    if os.geteuid() != 0:
        pytest.skip("faasrm bench real needs root")
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    if docker_engine.base_url and not env.get("DOCKER_HOST"):
        env["DOCKER_HOST"] = docker_engine.base_url  # the command finds this session's engine
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "bench",
            "real",
            "--runtime",
            "docker",
            "--managers",
            "fixed,rule",
            "--minutes",
            "0.1",
            "--repeats",
            "1",
            "--json",
            str(out),
            "--records",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "left behind" not in proc.stderr, proc.stderr
    records = {m: rounds[0] for m, rounds in json.loads(out.read_text())["records"].items()}
    assert records["rule"] and len(records["rule"]) == len(records["fixed"])
    # every start hook named a container the sidecar's Docker runtime knew and got an allocation
    assert all(r["error"] is None and r["outcome"] == "success" for r in records["rule"]), records[
        "rule"
    ]
