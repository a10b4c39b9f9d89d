"""The model card: how the shipped policy was trained and how it scored, next to the ONNX file.

``python -m training.card --run RUN_DIR --model models/default.onnx --eval SEEDS.json
[OTHER.json ...] [--capacity CAP.json] --command "..." --wall-s S`` writes the card (``--card``,
default ``models/MODEL_CARD.md``) and adds ``training``, ``evaluation`` and ``scored`` sections to
the model's ``<model>.json`` metadata (its sha256 stays the ONNX file's). ``--eval`` files are
``faasrm sim eval --seeds ... --json`` outputs (figures pooled over seeds, with intervals);
``--capacity`` a ``faasrm sim capacity --json`` output.

Without ``--run`` the card re-scores a shipped model: the training facts already in its metadata
are kept and only the figures are renewed, so a card follows the code's defaults (``make card``)
without retraining.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import time
from pathlib import Path

import sidecar
from training.evaluate import SEEDS_COLUMNS as COLUMNS
from training.evaluate import render_choices

ORDER = (
    "fixed",
    "rule",
    "smallest",
    "greedy",
    "ensure",
    "vpa",
    "oracle_in_box",
    "oracle",
    "learned",
)
RIVALS = ("rule", "smallest", "oracle_in_box", "oracle", "vpa", "fixed")


def _cell(m: dict, key: str, fmt: str, ci: bool) -> str:
    text = fmt.format(m[key])
    if ci and key + "_ci" in m:
        lo, hi = m[key + "_ci"]
        text += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
    return text


def _table(pooled: dict[str, dict]) -> list[str]:
    head = "| manager | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    order = sorted(pooled, key=lambda n: (ORDER + (n,)).index(n))
    rows = [
        f"| {n} | " + " | ".join(_cell(pooled[n], *c[::2], c[3]) for c in COLUMNS) + " |"
        for n in order
    ]
    return [head, rule, *rows]


def _versus(pooled: dict[str, dict]) -> list[str]:
    """The learned policy's mean RFET minus each rival's, paired over the same invocations."""
    vs = pooled.get("learned", {}).get("vs", {})
    out = []
    for rival in (r for r in RIVALS if r in vs):
        d = vs[rival]
        lo, hi = d["mean_rfet_diff_ci"]
        out.append(
            f"- learned - {rival}: {d['mean_rfet_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] "
            f"({d['verdict']})"
        )
    return out


def _capacity(report: dict) -> list[str]:
    cfg = report["config"]
    ref = report["reference_p98_response_s"]["pooled"]
    loads = [f"{x:g}" for x in cfg["loads"]]
    lines = [
        f"`faasrm sim capacity`, seeds {', '.join(map(str, cfg['seeds']))} pooled: p98 response "
        "time (s) with its 95% interval at each load (arrivals compressed by the load), and each "
        f"manager's capacity, the highest load held within {cfg['slack']:g}x Fixed's p98 "
        f"response at load 1 ({ref:.1f} s).",
        "",
        "| manager | " + " | ".join(f"load {x}" for x in loads) + " | capacity (per seed) |",
        "|---" * (len(loads) + 2) + "|",
    ]
    for m, res in report["results"].items():
        cells = []
        for x in loads:
            r = res["loads"][x]
            lo, hi = r["p98_response_s_ci"]
            cells.append(f"{r['p98_response_s']:.1f} [{lo:.1f}, {hi:.1f}]")
        per = ", ".join(f"{c:g}" for c in res["capacity_per_seed"].values())
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {res['capacity']:g} ({per}) |")
    return lines


def _training(run: Path, command: str, wall_s: float) -> dict:
    """The facts of one training run, from its metrics.csv."""
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    last = rows[-1] if rows else {}
    return {
        "command": command,
        "wall_time_s": round(wall_s),
        "global_step": int(last.get("global_step", 0)),
        "iterations": int(last.get("iteration", 0)),
        "final_train_mean_rfet": float(last.get("sim/mean_rfet", "nan")),
    }


def _code_commit() -> str:
    """faasrm's version, with the git commit when run from a checkout."""
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
    )
    return sidecar.__version__ + (f" ({git.stdout.strip()})" if git.returncode == 0 else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--run",
        help="training run dir (metrics.csv); without it the metadata's training facts are kept",
    )
    p.add_argument("--model", required=True, help="the exported .onnx")
    p.add_argument("--eval", nargs="+", required=True, help="faasrm sim eval --seeds --json files")
    p.add_argument("--capacity", help="a faasrm sim capacity --json output")
    p.add_argument("--command", help="the commands that produced the model (with --run)")
    p.add_argument("--wall-s", type=float, help="training wall time, seconds (with --run)")
    p.add_argument("--notes", help="a Markdown file of findings appended to the card")
    p.add_argument("--preset", default="paper", help="the simulator preset of the evaluations")
    p.add_argument("--card", help="where to write the card (default: MODEL_CARD.md beside it)")
    a = p.parse_args(argv)

    meta_path = Path(a.model + ".json")
    meta = json.loads(meta_path.read_text())
    if a.run is not None:
        if a.command is None or a.wall_s is None:
            p.error("--run needs --command and --wall-s")
        meta["training"] = _training(Path(a.run), a.command, a.wall_s)
    elif "training" not in meta:
        p.error(f"{meta_path} has no training facts to keep: give --run, --command and --wall-s")
    training = meta["training"]
    evals = {Path(e).stem: json.loads(Path(e).read_text()) for e in a.eval}
    capacity = json.loads(Path(a.capacity).read_text()) if a.capacity else None
    scored = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "code_version": _code_commit()}
    meta["scored"] = scored
    meta["evaluation"] = {
        name: {m: {k: v for k, v in row.items() if k != "per_seed"} for m, row in pooled.items()}
        for name, pooled in evals.items()
    }
    if capacity is not None:
        meta["capacity"] = {m: r["capacity"] for m, r in capacity["results"].items()}
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    lines = [
        f"# The shipped policy: `models/{Path(a.model).name}`",
        "",
        f"sha256 `{meta['sha256']}`; feature schema v{meta.get('feature_version')} "
        f"(hash `{meta.get('schema_hash')}`); grid `{meta.get('grid')}`.",
        "",
        "## How it was trained",
        "",
        "```sh",
        training["command"],
        "```",
        "",
        f"Wall time {training['wall_time_s'] / 60:.1f} min on this 2-core machine (CPU only); "
        f"{training['global_step']:,} PPO decisions in {training['iterations']} iterations, "
        "after a behaviour-cloning warm start from the Oracle projected onto the safeguard's "
        "ranges (training/pretrain.py). Training workloads use random seeds drawn per episode; the "
        "evaluation seeds below were never used in training.",
        "",
        f"## How it scored (simulator, `{a.preset}` preset, every manager on the same workloads)",
        "",
        f"Scored on {scored['date']} with faasrm {scored['code_version']}, under that code's "
        "default safeguard and memory settings.",
        "",
        "Figures pooled over the seeds named, with 95% intervals from the bootstrap over seeds and "
        "invocations (`training/evidence.py`); `rule` and `smallest` are the daemon's model-free "
        "rules (the allowed candidate closest to the user's size; the fewest resources allowed), "
        "the bar a learned policy must clear.",
        "",
    ]
    for name, pooled in evals.items():
        lines += [f"### {name}", "", *_table(pooled), ""]
        versus = _versus(pooled)
        if versus:
            lines += ["Mean RFET, paired differences (negative: learned faster):", "", *versus, ""]
        choices = render_choices(pooled)
        if choices:
            lines += ["```", *choices, "```", ""]
    if capacity is not None:
        lines += ["## Capacity", "", *_capacity(capacity), ""]
    if a.notes:
        lines += ["## Notes", "", Path(a.notes).read_text().strip(), ""]
    out = Path(a.card) if a.card else Path(a.model).parent / "MODEL_CARD.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {meta_path}")


if __name__ == "__main__":
    main()
