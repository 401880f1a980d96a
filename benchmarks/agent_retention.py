"""Retrieval quality of the agent path: queries the LM writes, embedded from generation's own states.

On held-out DSTC11 dialogues (`--split test`: the split the head's training left out, reported once;
`--split dev` to choose settings), the agent (`NativeRetriever`) writes a search query for each dialogue in
one `generate()`; then four ways of embedding "what the user needs now" are searched in the same
teacher-built index of the whole corpus and scored against the gold documents:

- teacher, dialogue: the teacher on history + question (the usual two-model baseline; what training imitates);
- head, user turn: the head on the last user message's states from that generate()'s prefill (equal to
  `model.encode(messages)`, the conversation mode the head was trained on; no extra pass);
- teacher, LM's query: the two-model agent: the LM writes the query, the teacher embeds its text;
- head, LM's query: the native agent: the head on the states generation computed for the query's tokens.

Retention of the native agent = head / teacher on the LM's query (same query text, two embedders).
Writes benchmarks/results/agent_retention_<split>.{json,md}. Usage:

    .venv/bin/python benchmarks/agent_retention.py [--split dev|test] [--head DIR] [--max-queries N] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    DATA,
    ROOT,
    add_common_arguments,
    describe_machine,
    fmt,
    head_summary,
    load_model_and_teacher,
    machine_info,
    resolve_head,
    set_threads,
    write_results,
)
from quality import embedding_cache

DATASET = "dstc11_track5_val_reviewdoc"
METRICS = ("ndcg@10", "recall@10", "mrr@10")
LABELS = {"ndcg@10": "nDCG@10", "recall@10": "R@10", "mrr@10": "MRR@10"}
ARMS = {
    "teacher_dialogue": "teacher, dialogue (history + question)",
    "head_user_turn": "head, last user turn from generation's prefill (`user_turn`)",
    "teacher_generated": "teacher, the LM's query text (two-model agent)",
    "head_captured": "head, generation's states of the LM's query (`query`)",
}


def agent_embeddings(agent: Any, conversations: list, max_new_tokens: int) -> dict[str, Any]:
    """Per dialogue, from one generate(): the LM's query embedding and text, the user-turn embedding, the span's
    source."""
    captured, user_turn, texts, sources = [], [], [], []
    start = time.perf_counter()
    for i, conversation in enumerate(conversations):
        result = agent.generate_and_search(conversation, k=1, max_new_tokens=max_new_tokens)
        captured.append(result.query_embedding)
        user_turn.append(result.user_turn_embedding)
        texts.append(result.query_text)
        sources.append(result.span.source)
        if (i + 1) % 25 == 0:
            print(f"  {i + 1}/{len(conversations)} dialogues, {time.perf_counter() - start:.0f} s", flush=True)
    return {"head_captured": torch.stack(captured).numpy(), "head_user_turn": torch.stack(user_turn).numpy(),
            "texts": texts, "sources": sources, "agent_s": time.perf_counter() - start}


def score_arms(embeddings: dict[str, np.ndarray], index: Any, query_ids: list[str], qrels: Any) -> dict[str, Any]:
    from retrieval_head.evaluation import retrieval_metrics
    from retrieval_head.evaluation.metrics import topk_overlap

    ranked = {}
    for arm, vectors in embeddings.items():
        _, ids = index.search(vectors, 100)
        ranked[arm] = dict(zip(query_ids, ids, strict=True))
    metrics = {arm: retrieval_metrics(r, qrels) for arm, r in ranked.items()}
    overlap = topk_overlap(ranked["head_captured"], ranked["teacher_generated"])
    return {"metrics": metrics, "top10_overlap_captured_vs_teacher": float(np.mean(list(overlap.values())))}


def percent(ratios: dict[str, float], metric: str) -> str:
    return f"{100 * ratios[metric]:.0f}%" if metric in ratios else "—"


def markdown(result: dict[str, Any]) -> str:
    m, r = result["metrics"], result["retention"]
    lines = [
        "## Agent path: retrieval with queries the LM writes, embedded from generation's states",
        "",
        f"Head: {result['head']['description']}; teacher {result['head']['teacher']}. {result['queries']} held-out "
        f"{result['split_name']} dialogues of {result['dataset']} (split dev {result['split']['dev']} / test "
        f"{result['split']['test']} / seed {result['split']['seed']}{result['sample_note']}), index = the teacher's "
        f"embeddings of all {result['documents']} documents; greedy generation, at most {result['max_new_tokens']} "
        f"new tokens. Machine: {describe_machine(result['machine'])}.",
        "",
        "| query embedding | " + " | ".join(LABELS[k] for k in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for arm, label in ARMS.items():
        lines.append(f"| {label} | " + " | ".join(fmt(m[arm][k]) for k in METRICS) + " |")
    lines += [
        "",
        "| retention | " + " | ".join(LABELS[k] for k in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
        "| head on the LM's query vs teacher on the same query text | "
        + " | ".join(percent(r["captured_vs_teacher_generated"], k) for k in METRICS) + " |",
        "| head on the LM's query vs teacher on the dialogue | "
        + " | ".join(percent(r["captured_vs_teacher_dialogue"], k) for k in METRICS) + " |",
        "| head on the user turn vs teacher on the dialogue | "
        + " | ".join(percent(r["user_turn_vs_teacher_dialogue"], k) for k in METRICS) + " |",
        "",
        f"Where the query came from: {', '.join(f'{k} {v}' for k, v in result['span_sources'].items())} "
        "(`markers`: the LM closed `<query>...</query>`; `open_marker`: it did not close it, the query runs to the "
        "end of the turn). Top-10 agreement of the native agent with the teacher on the same query text: "
        f"{result['top10_overlap_captured_vs_teacher']:.2f}.",
        "",
        "Examples (dialogue's last user turn -> the LM's query):",
        "",
    ]
    for example in result["examples"]:
        lines.append(f"- {example['question']!r} -> {example['query']!r}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--split", choices=("dev", "test"), default="test",
                        help="Held-out split: dev to choose settings, test to report (default: %(default)s).")
    parser.add_argument("--max-queries", type=int, default=None, help="Seeded sample of the dialogues.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Query length cap (default: %(default)s).")
    parser.add_argument("--index-dir", default=str(ROOT / ".cache" / "indexes"),
                        help="Where the teacher index is kept and reused (default: %(default)s).")
    parser.add_argument("--embeddings", default=str(ROOT / ".cache" / "features"),
                        help="Teacher embedding cache (see quality.py; default: %(default)s).")
    args = parser.parse_args()
    set_threads(args.threads)
    spec = resolve_head(args.head)
    from retrieval_head.agent import NativeRetriever
    from retrieval_head.commands.eval import load_or_build_index, sample_queries
    from retrieval_head.evaluation.compare import check_teacher, split_settings, teacher_texts
    from retrieval_head.evaluation.metrics import retention
    from retrieval_head.retrieval.data import load_dataset_folder

    model, teacher, description = load_model_and_teacher(spec)
    model.eval()
    fingerprint = check_teacher(model, teacher)
    dataset = load_dataset_folder(DATA / DATASET)
    s = split_settings(model)
    held = dataset.split(dev_fraction=s["dev"], test_fraction=s["test"], seed=s["seed"])
    test = sample_queries(held.test if args.split == "test" else held.dev, args.max_queries)
    queries = [q for q in test.queries if q.id in test.relevant_docs()]
    index_dir = Path(args.index_dir) / DATASET if args.index_dir else None
    index, _ = load_or_build_index(index_dir, teacher, dataset, fingerprint, cache=embedding_cache(args.embeddings))
    agent = NativeRetriever(model, index)
    started = time.perf_counter()
    with torch.inference_mode():
        native = agent_embeddings(agent, [q.as_messages() for q in queries], args.max_new_tokens)
        dialogue_texts, _ = teacher_texts(queries, teacher)
        embeddings = {
            "teacher_dialogue": teacher.encode(dialogue_texts, convert_to_numpy=True),
            "head_user_turn": native["head_user_turn"],
            "teacher_generated": teacher.encode(native["texts"], convert_to_numpy=True),
            "head_captured": native["head_captured"],
        }
    scored = score_arms(embeddings, index, [q.id for q in queries], test.qrels)
    m = scored["metrics"]
    result = {
        "benchmark": "agent_retention", "machine": machine_info(),
        "head": {**head_summary(model), "description": description, "spec": spec},
        "dataset": DATASET, "split": s, "split_name": args.split, "queries": len(queries), "documents": len(index),
        "sample_note": f"; a seeded sample of {len(queries)}" if args.max_queries else "",
        "max_new_tokens": args.max_new_tokens, "metrics": m,
        "retention": {
            "captured_vs_teacher_generated": retention(m["head_captured"], m["teacher_generated"]),
            "captured_vs_teacher_dialogue": retention(m["head_captured"], m["teacher_dialogue"]),
            "user_turn_vs_teacher_dialogue": retention(m["head_user_turn"], m["teacher_dialogue"]),
        },
        "top10_overlap_captured_vs_teacher": scored["top10_overlap_captured_vs_teacher"],
        "span_sources": dict(Counter(native["sources"])),
        "examples": [{"question": q.text, "query": t} for q, t in zip(queries[:8], native["texts"], strict=False)],
        "agent_s": round(native["agent_s"], 1), "wall_s": round(time.perf_counter() - started, 1),
    }
    text = markdown(result)
    write_results(args.name or f"agent_retention_{args.split}", result, text, args.results)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
