"""Retrieval quality of the head with fp32, float16 and int8 weights, side by side, on every held-out test split.

The question a user asks before `model.quantize_head("int8")`: how much quality does the faster head give up?
Each test query goes through the LM once; the head's weight-free features are kept and projected three ways
(fp32 as trained, float16 and int8 weights), so the three differ only in the head's weights. All three are
scored against the same teacher index as `benchmarks/quality.py` (same split, same teacher inputs), with the
teacher's own metrics for retention; also the largest difference to the fp32 embeddings, the lowest cosine
to them, and how many of the fp32 head's top 10 each keeps. Writes benchmarks/results/quantization.{json,md}.
Usage:

    .venv/bin/python benchmarks/quantization.py [--head DIR] [--datasets NAME ...] [--max-queries N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    add_common_arguments,
    add_dataset_arguments,
    describe_machine,
    head_summary,
    load_model_and_teacher,
    machine_info,
    publish,
    resolve_head,
    set_threads,
)
from quality import embedding_cache

PRECISIONS = (None, "float16", "int8")
METRICS = ("ndcg@10", "recall@10", "mrr@10")
LABELS = {"ndcg@10": "nDCG@10", "recall@10": "R@10", "mrr@10": "MRR@10"}


def label(dtype: str | None) -> str:
    return dtype or "float32"


@torch.inference_mode()
def head_embeddings(model: Any, inputs: list, batch_size: int) -> dict[str, np.ndarray]:
    """Every precision's embedding of each input, rendered as `encode_query` renders it, from one LM pass: a
    batch's weight-free head features (pooled, or the span's tokens for a token-level head) projected with each
    precision's weights in turn."""
    prompt = (model.config.prompts or {}).get("query", "")
    renderer = model.renderer
    rendered = [renderer.render(item, prompt) for item in inputs]
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i].input_ids))
    out = {label(d): np.empty((len(rendered), model.config.output_dim), dtype=np.float32) for d in PRECISIONS}
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = renderer.collate([rendered[i] for i in rows], device=model.device)
            states = model.layer_states(batch["input_ids"], batch["attention_mask"])
            mask = batch["span_mask"]
            features = model.head.features(states, mask)
            ids = model.head.span_ids(batch["input_ids"], mask) if model.head.uses_ids else None
            for dtype in PRECISIONS:
                model.quantize_head(dtype)
                out[label(dtype)][rows] = model.head.project_features(features, mask, ids).float().cpu().numpy()
    finally:
        model.quantize_head(None)
    return out


def evaluate_dataset(name: str, model: Any, teacher: Any, fingerprint: Any, args: argparse.Namespace) -> dict:
    from retrieval_head.commands.eval import load_or_build_index, sample_queries
    from retrieval_head.evaluation.compare import compare_head_and_teacher, head_inputs, held_out
    from retrieval_head.evaluation.evaluator import RetrievalEvaluator
    from retrieval_head.evaluation.metrics import topk_overlap
    from retrieval_head.retrieval.data import load_dataset_folder

    dataset = load_dataset_folder(Path(args.data_root) / name)
    test = sample_queries(held_out(dataset, model), args.max_queries)
    index_dir = Path(args.index_dir) / name if args.index_dir else None
    index, _ = load_or_build_index(index_dir, teacher, test, fingerprint, cache=embedding_cache(args.embeddings))
    evaluator = RetrievalEvaluator(test, index, name=name, expected_teacher=fingerprint)
    inputs = head_inputs(evaluator.queries)
    embeddings = head_embeddings(model, inputs, args.batch_size)
    check = np.asarray(model.encode_query(inputs[:8], batch_size=8))  # the features are what encode() reads
    if not np.allclose(embeddings["float32"][:8], check, atol=1e-4):
        raise SystemExit(f"error: {name}: projected features differ from encode_query(); the benchmark is wrong")
    exact, exact_ranked = embeddings["float32"], evaluator.rank(embeddings["float32"])
    out: dict[str, Any] = {"dataset": name, "queries": len(inputs), "precisions": {}}
    for key, emb in embeddings.items():
        report = compare_head_and_teacher(model, teacher, test, index=index, fingerprint=fingerprint, bm25=False,
                                          head_embeddings=emb, batch_size=args.batch_size)
        cosine = (emb * exact).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(exact, axis=1))
        overlap = topk_overlap(evaluator.rank(emb), exact_ranked, k=10)
        out["teacher"] = report["metrics"]["teacher"]
        out["precisions"][key] = {
            "metrics": report["metrics"]["head"], "retention": report["retention"],
            "max_abs_diff_vs_fp32": float(np.abs(emb - exact).max()), "min_cosine_vs_fp32": float(cosine.min()),
            "top10_overlap_with_fp32": float(np.mean(list(overlap.values()))),
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"## Head weights, {result['head']['head_type']} head: fp32 vs float16 vs int8 (held-out test splits)",
        "",
        f"Head: {result['head']['description']}; teacher {result['head']['teacher']}. The same LM states, projected "
        "by the head with each weight precision (`model.quantize_head`); the test splits of the quality benchmark. "
        "Machine: "
        f"{describe_machine(result['machine'])}.",
        "",
        "| dataset | queries | weights | nDCG@10 / R@10 / MRR@10 | retained nDCG@10 / R@10 / MRR@10 "
        "| max abs diff vs fp32 | min cosine vs fp32 | fp32 top-10 kept |",
        "|---|---:|---|---|---|---:|---:|---:|",
    ]
    for r in result["datasets"]:
        for key in map(label, PRECISIONS):
            p = r["precisions"][key]
            scores = " / ".join(f"{p['metrics'][m]:.3f}" for m in METRICS)
            kept = " / ".join(f"{100 * p['retention'][m]:.1f}%" for m in METRICS)
            lines.append(f"| {r['dataset']} | {r['queries']} | {key} | {scores} | {kept} | "
                         f"{p['max_abs_diff_vs_fp32']:.1e} | {p['min_cosine_vs_fp32']:.5f} | "
                         f"{100 * p['top10_overlap_with_fp32']:.1f}% |")
    lines.append("")
    mean = result["mean_retention"]
    means = ", ".join(f"{key} {100 * mean[key]['ndcg@10']:.1f}%" for key in map(label, PRECISIONS))
    lines.append(f"Mean nDCG@10 retention over the datasets: {means}. Speed of each: `latency.md`.")
    if "quantize_to" in result["head"]:
        weights = result["head"]["quantize_to"] or "float32"
        lines.append(f"The head loads with {weights} weights by default (its config's "
                     "`quantize_to`); `quantize_head_to=None` gives the fp32 rows.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_dataset_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="LM batch size (default: %(default)s).")
    args = parser.parse_args()
    set_threads(args.threads)
    spec = resolve_head(args.head)
    from retrieval_head.evaluation.compare import check_teacher

    model, teacher, description = load_model_and_teacher(spec, args.layer, args.head_type)
    model.quantize_head(None)  # the baseline: the fp32 weights as trained
    fingerprint = check_teacher(model, teacher)
    started = time.perf_counter()
    reports = []
    for name in args.datasets:
        reports.append(evaluate_dataset(name, model, teacher, fingerprint, args))
        print(f"{name}: " + ", ".join(f"{k} nDCG@10 {p['metrics']['ndcg@10']:.4f}"
                                      for k, p in reports[-1]["precisions"].items()), flush=True)
    keys = [label(d) for d in PRECISIONS]
    result = {
        "benchmark": "quantization", "machine": machine_info(), "max_queries": args.max_queries,
        "head": {**head_summary(model), "description": description, "spec": spec}, "datasets": reports,
        "mean_retention": {k: {m: float(np.mean([r["precisions"][k]["retention"][m] for r in reports]))
                               for m in METRICS} for k in keys},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    publish(args.name or "quantization", result, markdown, None, args.results)


if __name__ == "__main__":
    main()
