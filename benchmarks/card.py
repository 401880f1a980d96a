"""Put the benchmark numbers into a head's model card, so the card shows what the README's results show.

Reads `quality.json` (every dataset's held-out test split: head and teacher metrics), `latency.json` (batch 1)
and, when present, `agent_rag_turn.json` (time to the first answer token of a whole agent turn) from the results
folder, checks that they measured this head, writes them to the head's `config.json`
`metrics` (atomically; the weights are not touched) and re-renders its README.md card (text outside the
generated section is kept). Usage:

    .venv/bin/python benchmarks/card.py [--head heads/smollm2-135m-minilm] [--results benchmarks/results]
        [--quality quality] [--latency latency]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from common import RESULTS, SHIPPED_HEAD

QUALITY_METRICS = ("ndcg@10", "recall@10", "mrr@10", "recall@100")


def load_result(results: Path, benchmark: str, name: str, head: Path) -> dict[str, Any]:
    """The result `name` of `benchmark`, checked to have measured `head`."""
    path = results / f"{name}.json"
    rerun = f"benchmarks/{benchmark}.py --head {head}" + ("" if name == benchmark else f" --name {name}")
    if not path.is_file():
        raise SystemExit(f"error: {path} is missing; run {rerun}")
    data = json.loads(path.read_text(encoding="utf-8"))
    specs = [(data.get("head") or {}).get("spec"), *data.get("also_heads", {})]
    if not any(spec and Path(spec).resolve() == head.resolve() for spec in specs):
        raise SystemExit(f"error: {path} measured {specs[0]!r}, not {head}; rerun {rerun}")
    return data


def head_timings(batch: dict[str, Any], latency: dict[str, Any], head: Path) -> dict[str, Any]:
    """The (c) timings of `head` in one batch result: the benchmark's main head, or one of its `--also-head`."""
    if Path(latency["head"]["spec"]).resolve() == head.resolve():
        return batch
    return next(t for spec, t in batch.get("also_heads", {}).items() if Path(spec).resolve() == head.resolve())


def agent_turn_speed(results: Path, head: Path) -> dict[str, Any]:
    """Time to the first answer token of a whole agent turn per path (`agent_rag_turn.json`), when it measured
    `head`; {} otherwise (the card then has no agent-turn rows)."""
    path = results / "agent_rag_turn.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    spec = data["head"]["spec"] if isinstance(data["head"], dict) else data["head"]
    if Path(spec).resolve() != head.resolve():
        return {}
    names = {"a": "two_model", "b": "native_query", "c": "search_first", "d": "search_first_passage_cache",
             "p": "plain_answering_no_retrieval"}
    return {f"agent_turn_first_token_s_{names[k]}" + ("" if history == "cold" else f"_{history}"):
            round(p["first_token_s"]["median"], 2)
            for history, paths in data["history"].items() for k, p in paths.items()}


def card_metrics(quality: dict[str, Any], latency: dict[str, Any], head: Path) -> dict[str, Any]:
    """`config.metrics` in the card's shape: per dataset head + teacher metrics, plus a speed entry."""
    metrics: dict[str, Any] = {}
    for r in quality["datasets"]:
        metrics[r["dataset"]] = {
            "split": "test", "queries": r["queries"],
            **{side: {m: round(r["metrics"][side][m], 4) for m in QUALITY_METRICS} for side in ("head", "teacher")},
        }
    batch1 = next(b for b in latency["batches"] if b["batch_size"] == 1)
    timings = head_timings(batch1, latency, head)
    metrics["speed"] = {
        "device": f"CPU ({latency['machine']['cpu']}), {batch1['threads']} torch thread(s), batch 1",
        "head_ms_per_query_on_existing_states": round(timings["head"]["median_ms"], 3),
        **{f"head_{dtype}_weights_ms_per_query_on_existing_states": round(timings[f"head_{dtype}"]["median_ms"], 3)
           for dtype in ("float16", "int8") if f"head_{dtype}" in timings},
        "lm_forward_plus_head_ms_per_query": round(batch1["lm_head"]["median_ms"], 1),
        "teacher_ms_per_query": round(batch1["teacher"]["median_ms"], 2),
    }
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default=str(SHIPPED_HEAD), help="Head folder (default: %(default)s).")
    parser.add_argument("--results", default=str(RESULTS), help="Results folder (default: %(default)s).")
    parser.add_argument("--quality", default="quality", help="Name of the quality result (default: %(default)s).")
    parser.add_argument("--latency", default="latency", help="Name of the latency result (default: %(default)s).")
    args = parser.parse_args()
    from retrieval_head.core.config import RetrievalHeadConfig
    from retrieval_head.io.modelcard import CARD_NAME, write_card

    head, results = Path(args.head), Path(args.results)
    quality, latency = (load_result(results, "quality", args.quality, head),
                        load_result(results, "latency", args.latency, head))
    config_path = head / "config.json"
    data = json.loads(config_path.read_text(encoding="utf-8"))
    data["metrics"] = card_metrics(quality, latency, head)
    data["metrics"]["speed"].update(agent_turn_speed(results, head))
    tmp = config_path.with_name(".config.json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, config_path)
    config = RetrievalHeadConfig.from_pretrained(head)
    card = head / CARD_NAME
    write_card(head, config, existing=card.read_text(encoding="utf-8") if card.is_file() else None,
               num_head_parameters=quality["head"]["parameters"])
    print(f"updated {config_path} metrics ({', '.join(k for k in data['metrics'] if k != 'speed')} + speed) "
          f"and {card}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
