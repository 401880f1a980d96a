"""Dev retention against the amount of label-free alignment text, from training runs' logs.

Each `--run` is a training run folder (`retrieval-head train --output DIR`) of the same recipe with another
`data.corpus_texts`; the script reads its `recipe.yaml` and `train_log.jsonl`, counts its training texts (train
queries + corpus sentences of every dataset, before oversampling) and takes the mean dev nDCG@10 retention at
`--step` (the same step for every run, so the schedule does not differ). Writes
benchmarks/results/alignment_curve.{json,md,png}. Usage:

    .venv/bin/python benchmarks/alignment_curve.py --step 6000 --run "static 64=runs/E35" --run "static 64=runs/E33"

`--keep` keeps the points already in the results file (runs whose folders are gone) and adds or replaces by run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common import RESULTS, publish, pyplot


def run_point(folder: Path, step: int) -> dict[str, Any]:
    """(training texts, dev retention at `step`) of one run folder."""
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in rows if r.get("event") == "start")
    dev = next((r["dev"] for r in rows if r.get("step") == step and isinstance(r.get("dev"), dict)
                and "mean_retention" in r["dev"]), None)
    if dev is None:
        raise SystemExit(f"error: {folder} has no dev evaluation at step {step}")
    import yaml

    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    return {
        "run": folder.name, "corpus_texts_per_dataset": recipe["data"]["corpus_texts"],
        "static_dim": recipe["head"].get("static_dim", 0), "train_rows": start.get("train_examples"),
        "step": step, "mean_ndcg@10_retention": round(dev["mean_retention"]["ndcg@10"], 4),
        "per_dataset": {name: round(v["retention"]["ndcg@10"], 4) for name, v in dev.items()
                        if name != "mean_retention"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                        help="A curve label and a run folder (repeat; runs of one label form one line).")
    parser.add_argument("--step", type=int, default=6000)
    parser.add_argument("--keep", action="store_true", help="Keep the points of the existing results file.")
    args = parser.parse_args()
    points = []
    existing = RESULTS / "alignment_curve.json"
    if args.keep and existing.is_file():
        previous = json.loads(existing.read_text())
        if previous.get("step") != args.step:
            raise SystemExit(f"error: {existing} holds step {previous.get('step')}, not --step {args.step}")
        points = previous["points"]
    for item in args.run:
        label, _, folder = item.partition("=")
        point = {"label": label, **run_point(Path(folder), args.step)}
        points = [p for p in points if (p["run"], p["label"]) != (point["run"], point["label"])] + [point]
    publish("alignment_curve", {"step": args.step, "points": points}, markdown, plot)


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Dev nDCG@10 retention vs alignment text (default recipe, step {result['step']})", "",
             "| head | corpus sentences per dataset | train rows (queries oversampled + sentences) | mean dev retention"
             " | per dataset |", "|---|---:|---:|---:|---|"]
    for p in result["points"]:
        per = ", ".join(f"{k.split('_')[0]} {v:.2f}" for k, v in p["per_dataset"].items())
        lines.append(f"| {p['label']} | {p['corpus_texts_per_dataset']} | {p['train_rows']} | "
                     f"{p['mean_ndcg@10_retention']:.3f} | {per} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(p["label"] for p in result["points"]):
        pts = sorted((p["train_rows"], p["mean_ndcg@10_retention"]) for p in result["points"] if p["label"] == label)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training rows (queries + corpus sentences)")
    ax.set_ylabel("mean dev nDCG@10 retention")
    ax.set_title(f"Retention vs alignment text (step {result['step']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
