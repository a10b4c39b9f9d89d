"""`faasrm train` -> `faasrm export` -> `faasrm sim eval ... learned`, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _faasrm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _sim_eval(out: Path, managers: str, *args: str) -> dict:
    """`faasrm sim eval` on the sample preset; its JSON figures."""
    _faasrm("sim", "eval", "--preset", "sample", "--managers", managers, *args, "--json", str(out))
    return json.loads(out.read_text())


def test_train_export_eval_end_to_end(tmp_path):
    run = tmp_path / "run"
    _faasrm(
        "train",
        "--preset",
        "sample",
        "--total-timesteps",
        "256",
        "--num-envs",
        "2",
        "--num-steps",
        "64",
        "--episode-decisions",
        "64",
        "--out-dir",
        str(run),
        "--no-progress",
    )
    assert (run / "checkpoint.pt").exists()
    model = tmp_path / "policy.onnx"
    exported = _faasrm("export", str(run / "checkpoint.pt"), str(model))
    assert max(json.loads(exported.stdout)["parity_max_err"].values()) < 1e-5
    meta = json.loads((tmp_path / "policy.onnx.json").read_text())
    assert len(meta["sha256"]) == 64
    results = _sim_eval(tmp_path / "eval.json", "fixed,oracle,learned", "--model", str(model))
    assert set(results) == {"fixed", "oracle", "learned"}
    assert results["learned"]["invocations"] == results["fixed"]["invocations"] == 268
    # The safeguard bounds even a barely trained policy: no invocation fails twice as slow.
    assert results["learned"]["p98_rfet"] < 2.0


def test_sim_eval_decides_under_the_named_memory_box(tmp_path):
    """The ``--mem-*`` flags reach the evaluated safeguard: `smallest` in the default quarter-unit
    box holds fewer MB-seconds than in the reference's whole unit; more when the margin also
    follows the functions' spread, or when memory is harvested only after a function's first
    calls; ``--restart-every`` reaches the cluster; and ``--v1-memory-harvest hard`` decides in
    the whole unit unless a margin is named, as a node's config does."""
    held = {}
    for name, flags in (
        ("reference", ("--mem-margin-units", "1")),
        ("tight", ()),
        ("tight+spread", ("--mem-margin-units", "0.25", "--mem-margin-sd", "3")),
        ("after", ("--mem-margin-units", "1", "--mem-harvest-after", "5")),
        ("restarts", ("--mem-margin-units", "1", "--restart-every", "60")),
        ("hard", ("--v1-memory-harvest", "hard")),
        ("hard+tight", ("--v1-memory-harvest", "hard", "--mem-margin-units", "0.25")),
    ):
        res = _sim_eval(tmp_path / f"{name}.json", "smallest", *flags)
        held[name] = res["smallest"]["alloc_mem_ratio"]
    assert held["tight"] < held["tight+spread"] < 1.0
    assert held["tight"] < held["reference"] < held["after"] < 1.0
    # a node that forgets every minute calibrates every function again at the user's size
    assert held["reference"] < held["restarts"] < 1.0
    # the hard limit's kills move the figures a little; the box is what moves them most
    assert abs(held["hard"] - held["reference"]) < 0.01
    assert abs(held["hard+tight"] - held["tight"]) < 0.01 < held["hard"] - held["hard+tight"]


def _card(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.card", *args], capture_output=True, text=True, timeout=60
    )


def test_card_written_from_a_run_then_rescored_without_one(tmp_path):
    """A card made from a training run keeps that run's facts when only the scores are renewed
    (`make card`), and a model with no training facts is refused without being touched."""
    run, model = tmp_path / "run", tmp_path / "policy.onnx"
    _faasrm(
        "train", "--preset", "sample", "--total-timesteps", "128", "--num-envs", "2",
        "--num-steps", "64", "--episode-decisions", "64", "--out-dir", str(run), "--no-progress",
    )  # fmt: skip
    _faasrm("export", str(run / "checkpoint.pt"), str(model))
    meta_path, card = tmp_path / "policy.onnx.json", tmp_path / "CARD.md"
    bare_meta = meta_path.read_text()

    first = tmp_path / "first" / "sample_seeds1-2.json"
    first.parent.mkdir()
    _sim_eval(first, "fixed,rule,smallest,learned", "--seeds", "1,2", "--model", str(model))
    made = _card(
        "--run", str(run), "--model", str(model), "--eval", str(first), "--preset", "sample",
        "--command", "faasrm train --preset sample", "--wall-s", "90", "--card", str(card),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    trained = json.loads(meta_path.read_text())["training"]
    assert trained["command"] == "faasrm train --preset sample"
    assert trained["wall_time_s"] == 90 and trained["global_step"] == 128

    # Re-scored under other settings, without the run: the figures follow, the training stays.
    again = tmp_path / "again" / "sample_seeds1-2.json"
    again.parent.mkdir()
    figures = _sim_eval(
        again, "fixed,rule,smallest,learned", "--seeds", "1,2", "--model", str(model),
        "--mem-margin-units", "1",
    )  # fmt: skip
    assert (
        figures["learned"]["alloc_mem_ratio"]
        != json.loads(first.read_text())["learned"]["alloc_mem_ratio"]
    )
    rescored = _card("--model", str(model), "--eval", str(again), "--card", str(card))
    assert rescored.returncode == 0, rescored.stderr
    meta = json.loads(meta_path.read_text())
    assert meta["training"] == trained
    learned = meta["evaluation"]["sample_seeds1-2"]["learned"]
    assert learned["alloc_mem_ratio"] == figures["learned"]["alloc_mem_ratio"]
    assert meta["scored"]["date"] and meta["scored"]["code_version"]
    text = card.read_text()
    assert "faasrm train --preset sample" in text and "Wall time 1.5 min" in text
    assert f"| learned | {figures['learned']['mean_rfet']:.4f} [" in text

    # A bare export has no training facts to keep: refused, and its metadata left as it was.
    meta_path.write_text(bare_meta)
    refused = _card("--model", str(model), "--eval", str(again), "--card", str(card))
    assert refused.returncode == 2 and "no training facts" in refused.stderr
    assert meta_path.read_text() == bare_meta
    half = _card("--run", str(run), "--model", str(model), "--eval", str(again))
    assert half.returncode == 2 and "--run needs --command and --wall-s" in half.stderr
