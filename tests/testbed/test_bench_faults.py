"""``faasrm bench faults`` end to end with its smallest settings, and its cleanup on Ctrl-C.

Real trainer and sidecar processes, real cgroup v1 containers with worker processes (root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from testbed_helpers import cgroup_gone

from sidecar import cli
from training.faults import KEYS, TARGETS

SMALLEST = ["--kill-tries", "2", "--outage-s", "2", "--hook-posts", "60"]
SMALLEST += ["--trajectory-posts", "60"]


def test_every_target_is_met_and_everything_is_removed(
    tmp_path: Path, v1_root: None, capsys
) -> None:
    out = tmp_path / "faults.json"
    assert cli.main(["bench", "faults", *SMALLEST, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "targets met: yes" in printed
    report = json.loads(out.read_text())
    assert set(KEYS) <= set(report) and report["targets_met"] is True
    for key, target in TARGETS.items():
        assert report[key] == target, (key, report[key], report["scenarios"])
        assert key in printed
    sc = report["scenarios"]
    # every try killed the sidecar while both containers were off their user's size
    tries = sc["kill9"]["tries"]
    assert len(tries) == 2
    for t in tries:
        assert t["containers_off_user_at_kill"] == 2, t
        assert set(t["kinds_at_kill"]) <= {"harvested", "accelerated"} and t["kinds_at_kill"], t
        assert 0 < t["restore_s"] <= report["restore_after_kill_s"]
    # the trainer faults happened while records flowed, and every one arrived once
    assert sc["trainer_outage"]["finished_during_outage"] > 0
    assert sc["trainer_sigkill"]["batches_in_flight_at_kill"]
    # nothing the trainer started outlives its SIGKILL (its validators die with it)
    assert report["processes_outliving_sigkill"]["trainer"] == 0
    for check in (sc["trainer_outage"]["records"], sc["end"]["records"]):
        assert check["lost"] == check["duplicated"] == 0 and check["sqlite_integrity"] == "ok"
    assert sc["end"]["records"]["finished"] > 50
    # every malformed post was answered, with a 4xx, and both servers still answer
    # (the hooks: 6 more, bad ends of a running invocation)
    for name, posts in (("malformed_hooks", 60 + 6), ("malformed_trajectories", 60)):
        statuses = sc[name]["statuses"]
        assert sum(statuses.values()) == posts, statuses
        assert all(400 <= int(s) < 500 for s in statuses), statuses
    assert sc["malformed_hooks"]["running_invocation_survived_bad_ends"]
    assert sc["malformed_hooks"]["ready_after"] and sc["malformed_trajectories"]["healthy_after"]
    # each bad model got a 422 and the good one stayed the latest, on every node
    answers = sc["bad_models"]["answers"]
    assert set(answers) == {"corrupt", "random_bytes", "wrong_shape", "nan", "other_grid"}
    assert all(a["status"] == 422 for a in answers.values()), answers
    good = sc["bad_models"]["good_version"]
    assert sc["bad_models"]["latest_after"] == good
    assert set(sc["bad_models"]["nodes_versions_after"].values()) == {good}
    # the runtime failure was rolled back before the restart, and stayed so after it
    rb = sc["rollback"]
    assert rb["decided_before_rollback"][-1] == "fallback" and rb["rolled_back"]
    assert rb["decided_after_restart"] == [rb["good"]["model"]] * 4
    assert rb["bad"]["model"] not in rb["decided_after_restart"]
    assert sc["end"]["sidecar_exit_codes"] == {"node0": 0, "node1": 0}
    assert [c["after"] for c in report["off_user_checks"]][-2:] == ["end", "sigterm"]
    # nothing of the run is left: cgroups, working directory
    assert cgroup_gone(report["testbed"]["cgroups"])
    assert not Path(report["testbed"]["dir"]).exists()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (a unix socket's path is at most 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="f-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_ctrl_c_stops_every_process_and_removes_cgroups_and_files(
    short_tmp: Path, v1_root: None
) -> None:
    env = {**os.environ, "TMPDIR": str(short_tmp)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "bench", "faults", *SMALLEST],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # the testbed is up once the first scenario starts
            seen.append(line)
            if line.startswith("kill9"):
                break
        assert seen and seen[-1].startswith("kill9"), seen
        (run_dir,) = short_tmp.glob("faasrm-faults-*")
        toml = tomllib.loads((run_dir / "testbed" / "node0" / "sidecar.toml").read_text())
        parent = toml["cgroupfs"]["parent"].split("/")[0]
        assert not cgroup_gone(parent)
        kids = psutil.Process(proc.pid).children(recursive=True)
        assert len(kids) >= 3 + 4  # the trainer, two sidecars, four workers
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    _, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, [p.cmdline()[:5] for p in alive]
    assert cgroup_gone(parent)
    assert not list(short_tmp.iterdir())
