"""The model card: how the shipped policy was trained and how it scored, next to the ONNX file.

``python -m training.card --run RUN_DIR --model models/default.onnx --eval A.json [B.json ...]
--command "..."`` writes the card (``--card``, default ``models/MODEL_CARD.md``) and adds
``training`` and ``evaluation`` sections to the model's ``<model>.json`` metadata (its sha256
stays the ONNX file's).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

COLUMNS = (
    ("mean_rfet", "mean RFET", "{:.3f}"),
    ("p98_rfet", "p98 RFET", "{:.3f}"),
    ("p98_duration_s", "p98 exec s", "{:.1f}"),
    ("p98_response_s", "p98 resp s", "{:.1f}"),
    ("harvested_frac", "harvested", "{:.1%}"),
    ("accelerated_frac", "accelerated", "{:.1%}"),
    ("slowdown_frac_1_2", "RFET>1.2", "{:.2%}"),
    ("failures", "OOM", "{:d}"),
)


ORDER = ("fixed", "greedy", "ensure", "vpa", "oracle", "learned")


def _table(results: dict[str, dict]) -> list[str]:
    head = "| manager | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    rows = [
        f"| {name} | " + " | ".join(fmt.format(m[k]) for k, _, fmt in COLUMNS) + " |"
        for name, m in sorted(results.items(), key=lambda kv: (ORDER + (kv[0],)).index(kv[0]))
    ]
    return [head, rule, *rows]


def oracle_gain_share(results: dict[str, dict]) -> float:
    """Share of the Oracle's mean-RFET gain over Fixed that the learned policy achieves."""
    fixed, oracle, learned = (results[k]["mean_rfet"] for k in ("fixed", "oracle", "learned"))
    return (fixed - learned) / (fixed - oracle) if fixed > oracle else float("nan")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="training run dir (metrics.csv, checkpoint.pt)")
    p.add_argument("--model", required=True, help="the exported .onnx")
    p.add_argument("--eval", nargs="+", required=True, help="faasrm sim eval --json outputs")
    p.add_argument("--command", required=True, help="the commands that produced the model")
    p.add_argument("--wall-s", type=float, required=True, help="training wall time, seconds")
    p.add_argument("--notes", help="a Markdown file of findings appended to the card")
    p.add_argument("--preset", default="paper", help="the simulator preset of the evaluations")
    p.add_argument("--card", help="where to write the card (default: MODEL_CARD.md beside it)")
    a = p.parse_args(argv)

    rows = list(csv.DictReader(open(Path(a.run) / "metrics.csv")))
    last = rows[-1] if rows else {}
    meta_path = Path(a.model + ".json")
    meta = json.loads(meta_path.read_text())
    evals = {Path(e).stem: json.loads(Path(e).read_text()) for e in a.eval}
    training = {
        "command": a.command,
        "wall_time_s": round(a.wall_s),
        "global_step": int(last.get("global_step", 0)),
        "iterations": int(last.get("iteration", 0)),
        "final_train_mean_rfet": float(last.get("sim/mean_rfet", "nan")),
    }
    meta["training"] = training
    meta["evaluation"] = evals
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
        a.command,
        "```",
        "",
        f"Wall time {a.wall_s / 60:.1f} min on this 2-core machine (CPU only); "
        f"{training['global_step']:,} PPO decisions in {training['iterations']} iterations, "
        "after a behaviour-cloning warm start from the Oracle projected onto the safeguard's "
        "ranges (training/pretrain.py). Training workloads use random seeds drawn per episode; the "
        "evaluation seeds below were never used in training.",
        "",
        f"## How it scored (simulator, `{a.preset}` preset, same seeds for every manager)",
        "",
    ]
    for name, results in evals.items():
        lines += [f"### {name}", "", *_table(results), ""]
        if {"fixed", "oracle", "learned"} <= set(results):
            lines.append(
                f"Learned achieves {oracle_gain_share(results):.0%} of the Oracle's mean-RFET "
                "gain over Fixed."
            )
            lines.append("")
    if a.notes:
        lines += ["## Notes", "", Path(a.notes).read_text().strip(), ""]
    out = Path(a.card) if a.card else Path(a.model).parent / "MODEL_CARD.md"
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {meta_path}")


if __name__ == "__main__":
    main()
