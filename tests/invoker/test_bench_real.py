"""``faasrm bench real --repeats 2`` end to end on real cgroups: rounds in rotated order, the
noise row, every figure with its interval, by duration class and by function."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.invoker.invoker import Arrival, Measurement
from training.invoker.real import choice_shares, parse_managers, report, sidecar_box

pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[2]
STATS = (
    "invocations", "gmean_rfet", "gmean_rfet_ci", "mean_rfet", "p98_rfet", "p98_rfet_ci",
    "slowdown_frac_1_2", "slowdown_frac_1_2_ci", "time_weighted_rfet", "p98_duration_s",
    "p98_response_s", "response_ratio", "oom_kills", "failures", "verdict", "alloc_cpu_ratio",
    "alloc_mem_ratio",
    "by_duration", "by_function",
)  # fmt: skip


def test_bench_real_two_rounds_writes_the_noise_row_and_intervals(
    v1_root: None, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "bench",
            "real",
            "--managers",
            "fixed,smallest,smallest@asuser",
            "--sidecar-set",
            "asuser:model.rule=user",
            "--memory-mb",
            "1024",
            "--repeats",
            "2",
            "--minutes",
            "0.12",
            "--json",
            str(out),
            "--records",
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "left behind" not in proc.stderr, proc.stderr
    assert "gmean RFET" in proc.stdout and "noise" in proc.stdout, proc.stdout
    got = json.loads(out.read_text())
    assert got["config"]["repeats"] == 2
    assert got["config"]["memory_mb"] == 1024 and "memory pool: 1024 MB" in proc.stdout
    runs = ["fixed", "smallest", "smallest@asuser"]
    assert got["config"]["order"] == [runs, runs[::-1]]
    assert set(got["results"]) == set(runs)
    for row in (got["noise"], *got["results"].values()):
        for key in STATS:
            assert key in row, key
        assert set(row["by_duration"]) == {"lt_0.1s", "0.1_1s", "ge_1s"}
        for c in row["by_duration"].values():
            if c["invocations"]:
                assert {"gmean_rfet", "gmean_rfet_ci", "slowdown_frac_1_2"} <= set(c)
        lo, hi = row["gmean_rfet_ci"]
        assert lo <= row["gmean_rfet"] <= hi
    n = got["workload"]["invocations"]
    assert n > 0 and len(got["records"]["smallest"]) == 2
    assert all(len(rs) == n for rs in got["records"]["smallest"])
    # each sidecar call's resource-seconds are what its end hook reported it held: at least its
    # start allocation x its time (a give-back only adds); Fixed's calls have none to report
    for x in got["records"]["smallest"][0]:
        assert x["held_core_s"] >= x["cpu_cores"] * x["exec_s"] - 1e-5, x
        assert x["held_mb_s"] >= x["mem_mb"] * x["exec_s"] - 1e-3, x
    assert all(x["held_core_s"] is None for x in got["records"]["fixed"][0])
    # the noise row compares Fixed's second round with its first: one round's worth of pairs
    assert 0 < got["noise"]["invocations"] <= n
    assert got["results"]["smallest"]["verdict"] in ("faster", "slower", "indistinguishable")
    assert got["results"]["fixed"]["verdict"] == "reference"
    # every manager's rounds against each other; Fixed's is the noise row's figure
    for row in got["results"].values():
        lo, hi = row["rounds_gmean_ratio_ci"]
        assert lo <= row["rounds_gmean_ratio"] <= hi and isinstance(row["rounds_agree"], bool)
    assert got["results"]["fixed"]["rounds_gmean_ratio"] == pytest.approx(
        got["noise"]["gmean_rfet"]
    )
    assert "later/earlier rounds" in proc.stdout
    # the model-less sidecar ran its 'smallest' rule: it harvested where the safeguard allowed,
    # and every choice with more than one candidate was the box's smallest corner
    assert got["results"]["smallest"]["harvested_frac"] > 0
    choices = got["results"]["smallest"]["choices"]
    assert choices["decisions"] > 0 and choices["at_smallest"] == 1.0, choices
    assert "choices" not in got["results"]["fixed"] and "choices (decisions" in proc.stdout
    # the labelled run took its own setting and no other run did: the same sidecar, told to take
    # the allowed candidate closest to the user's size, harvested nothing
    variant = got["results"]["smallest@asuser"]
    assert variant["harvested_frac"] == 0 and variant["choices"]["at_user_closest"] == 1.0
    assert got["config"]["sidecar_settings"] == {
        "smallest": {},
        "smallest@asuser": {"model": {"rule": "user"}},
    }
    # and the box each sidecar decided in, defaults included, for a later simulation of the run
    boxes = got["config"]["sidecar_boxes"]
    assert boxes["smallest"] == boxes["smallest@asuser"] == sidecar_box({})
    assert boxes["smallest"]["safeguard"]["mem_margin_units"] == 0.25
    assert boxes["smallest"]["v1_memory_harvest"] == "hold"


def test_bench_real_refuses_a_setting_no_sidecar_can_take_before_it_runs(
    v1_root: None, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "bench", "real", "--managers", "smallest@odd"]
        + ["--sidecar-set", "odd:safeguard.mem_margin_units=3", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--sidecar-set for smallest@odd: safeguard.mem_margin_units 3.0 outside" in proc.stderr
    assert "trace:" not in proc.stdout and not out.exists()


def test_parse_managers_gives_each_labelled_run_its_settings_and_refuses_what_it_cannot_run() -> (
    None
):
    managers, settings = parse_managers(
        "smallest,learned@tight,learned",
        ["safeguard.mem_margin_sd=1", "tight:safeguard.mem_margin_sd=2", "tight:grid.x=1"],
    )
    assert managers == ["fixed", "smallest", "learned@tight", "learned"]
    assert settings == {
        "smallest": {"safeguard": {"mem_margin_sd": 1}},
        "learned@tight": {"safeguard": {"mem_margin_sd": 2}, "grid": {"x": 1}},  # its own wins
        "learned": {"safeguard": {"mem_margin_sd": 1}},
    }
    for managers_text, sets, why in (
        ("fixed@x", [], "only a sidecar manager"),  # Fixed and the invoker's rules take no config
        ("vpa@x", [], "only a sidecar manager"),
        ("smallest@Tight", [], "a-z"),
        ("smallest@" + "x" * 33, [], "1-32"),
        ("nope", [], "unknown manager"),
        ("smallest", ["tight:safeguard.mem_margin_sd=2"], "no manager is labelled 'tight'"),
        ("smallest@tight", ["tight:safeguard=2"], "SECTION.KEY=VALUE"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_managers(managers_text, sets)


def test_choice_shares_place_each_choice_in_the_safeguard_box() -> None:
    def m(units, user, allowed) -> Measurement:
        return Measurement(0, "f", 1.0, 0.0, units=units, user_units=user, allowed=allowed)

    records = [
        m((1, 2), (4, 4), (1, 3, 2, 5)),  # smallest corner; the rule's pick is (3, 4)
        m((3, 4), (4, 4), (1, 3, 2, 5)),  # the rule's pick: user clamped into the box
        m((2, 2), (2, 2), (1, 3, 2, 5)),  # both: the user's own size is inside, but not (1, 2)
        m((4, 4), (4, 4), (4, 4, 4, 4)),  # one candidate only: not a choice
        Measurement(0, "f", 1.0, 0.0),  # no sidecar
    ]
    got = choice_shares(records)
    assert got == {"decisions": 3, "at_smallest": 1 / 3, "at_user_closest": 2 / 3}
    assert choice_shares(records[3:]) is None


def test_alloc_ratios_count_what_a_sidecar_says_each_call_held_give_backs_included() -> None:
    """A sidecar call started harvested (0.5 core, 128 MB of the user's 1 core, 256 MB) and got
    its resources back mid-run: the end hook's ``held_core_s`` / ``held_mb_s`` are what it held,
    not its start allocation x its time. A call without them (no sidecar ran it) held its start
    allocation throughout, as Fixed's do."""
    arrivals = [Arrival(i, float(i), "f", 1.0) for i in range(2)]

    def call(i: int, cpu: float, mem: float) -> Measurement:
        return Measurement(i, "f", 1.0, float(i), float(i), 2.0, 2.0, "success", "user", cpu, mem)

    fixed = [call(0, 1.0, 256.0), call(1, 1.0, 256.0)]
    given_back = call(0, 0.5, 128.0)
    given_back.held_core_s, given_back.held_mb_s = 0.5 * 0.5 + 1.0 * 1.5, 128.0 * 1.0 + 256.0
    sidecar = [given_back, call(1, 0.5, 128.0)]
    none = dict.fromkeys(("fixed", "smallest"), 0)
    row = report({"fixed": [fixed], "smallest": [sidecar]}, none, none, arrivals)["results"]
    assert row["fixed"]["alloc_cpu_ratio"] == pytest.approx(1.0)
    assert row["smallest"]["alloc_cpu_ratio"] == pytest.approx((1.75 + 0.5 * 2.0) / 4.0)
    assert row["smallest"]["alloc_mem_ratio"] == pytest.approx((384.0 + 128.0 * 2.0) / 1024.0)
