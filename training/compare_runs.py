"""Compare training runs on their DEV splits (choose with this; report the test split once, for the choice).

usage: python training/compare_runs.py runs/*/
"""
import json
import sys
from pathlib import Path


def best_dev(run: Path) -> dict | None:
    """The dev evaluation of the run's best step, from its train_log.jsonl."""
    best = None
    for line in (run / "train_log.jsonl").read_text().splitlines():
        event = json.loads(line)
        if "best_step" in event and "dev" in event:
            best = event
    return best


def main(paths: list[str]) -> None:
    print(f"{'run':32} {'step':>5} " + " ".join(f"{d[:7]:>16}" for d in ("dstc11 nDCG/R10", "scifact nDCG/R10")))
    for path in paths:
        event = best_dev(Path(path))
        if event is None:
            continue
        cells = []
        for name in ("dstc11_track5_val_reviewdoc", "scifact_train"):
            r = event["dev"].get(name, {}).get("retention", {})
            cells.append(f"{r.get('ndcg@10', float('nan')):7.3f}/{r.get('recall@10', float('nan')):.3f}")
        print(f"{Path(path).name:32} {event['best_step']:>5} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main(sys.argv[1:])
