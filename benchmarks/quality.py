"""Retrieval quality: teacher vs head vs BM25 on the held-out test split of every bundled dataset.

For each dataset the teacher embeds the whole corpus into a flat (exact) index, kept in `--index-dir` and reused
(the documents' embeddings come from `--embeddings`, training's cache, when the same teacher embedded them);
the test split is the one training holds out (`RetrievalDataset.split()` with the split recorded in the head's
config, else the defaults dev 0.1 / test 0.2 / seed 0). The teacher embeds each query as history + question cut
from the left to fit its 256 tokens, the head reads the dialogue as chat messages, BM25 scores the teacher's text
(see `retrieval_head.evaluation.compare`). Reports nDCG@10, R@10, MRR@10 and retention (head / teacher).
Writes benchmarks/results/quality.{json,md,png}. Usage:

    .venv/bin/python benchmarks/quality.py [--head DIR] [--datasets NAME ...] [--max-queries N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    DATA,
    UNTRAINED,
    add_common_arguments,
    add_dataset_arguments,
    describe_machine,
    fmt,
    head_summary,
    load_model_and_teacher,
    machine_info,
    publish,
    pyplot,
    resolve_head,
    set_threads,
)

METRICS = ("ndcg@10", "recall@10", "mrr@10")
LABELS = {"ndcg@10": "nDCG@10", "recall@10": "R@10", "mrr@10": "MRR@10"}
SIDES = ("teacher", "head", "bm25")


def shrink_corpus(dataset: Any, max_docs: int) -> Any:
    """Smoke runs only: the evaluated queries' relevant documents plus the first others, up to `max_docs`."""
    from retrieval_head.data import RetrievalDataset

    keep = {d for docs in dataset.relevant_docs().values() for d in docs}
    for doc_id in dataset.doc_ids:
        if len(keep) >= max_docs:
            break
        keep.add(doc_id)
    corpus = {d: dataset.corpus[d] for d in dataset.doc_ids if d in keep}
    return RetrievalDataset(corpus, dataset.queries, dataset.qrels, name=dataset.name)


def embedding_cache(folder: str) -> Any:
    """The teacher embedding cache: `folder` (read and written) over the shipped one (read only); None for ''."""
    from retrieval_head.cache import LayeredCache

    return LayeredCache(folder, [DATA / "teacher-embeddings"]) if folder else None


def evaluate_dataset(name: str, model: Any, teacher: Any, fingerprint: Any, args: argparse.Namespace) -> dict:
    from retrieval_head.commands.eval import load_or_build_index, sample_queries
    from retrieval_head.data import load_dataset_folder
    from retrieval_head.evaluation.compare import compare_head_and_teacher, held_out

    dataset = load_dataset_folder(Path(args.data_root) / name)
    test = sample_queries(held_out(dataset, model), args.max_queries)
    index_dir = Path(args.index_dir) / name if args.index_dir else None
    if args.max_docs:
        test = shrink_corpus(test, args.max_docs)
        index_dir = None  # a reduced corpus is never cached
    start = time.perf_counter()
    index, how = load_or_build_index(index_dir, teacher, test, fingerprint, show_progress_bar=args.progress,
                                     cache=embedding_cache(args.embeddings))
    with torch.inference_mode():
        report = compare_head_and_teacher(model, teacher, test, index=index, fingerprint=fingerprint,
                                          batch_size=args.batch_size, show_progress_bar=args.progress)
    report["dataset"] = name
    report["index"]["source"] = how
    report["index_s"] = round(time.perf_counter() - start - sum(report["timings_s"].values()), 2)
    return report


def markdown(result: dict[str, Any]) -> str:
    head = result["head"]
    lines = [
        f"## Retrieval quality, {head['head_type']} head (held-out test splits)",
        "",
        f"Head: {head['description']}; teacher {head['teacher']}. Test split: "
        f"dev {result['split']['dev']} / test {result['split']['test']} / seed {result['split']['seed']}, by "
        "conversation or gold document (no query of it was trained on). Machine: "
        f"{describe_machine(result['machine'])}.",
    ]
    if result.get("smoke"):
        lines += ["", f"**Smoke run, not a measurement:** {result['smoke']}."]
    lines += [
        "",
        "| dataset | queries | " + " | ".join(f"{LABELS[m]} teacher / head / BM25" for m in METRICS)
        + " | retained " + " / ".join(LABELS[m] for m in METRICS) + " |",
        "|---|---:|" + "---|" * len(METRICS) + "---|",
    ]
    for r in result["datasets"]:
        m = r["metrics"]
        cells = [" / ".join(fmt(m[s][metric]) if s in m else "—" for s in SIDES) for metric in METRICS]
        kept = " / ".join(f"{100 * r['retention'][metric]:.0f}%" if metric in r["retention"] else "—"
                          for metric in METRICS)
        lines.append(f"| {r['dataset']}{' (dialogue)' if r['conversational'] else ''} | {r['queries']} | "
                     + " | ".join(cells) + f" | {kept} |")
    mean = result["mean_retention"]
    lines.append("| **mean retention** | | | | | " + " / ".join(f"**{100 * mean[m]:.0f}%**" for m in METRICS) + " |")
    agreement = ", ".join(f"{r['dataset']} {r['agreement']['top10_overlap_mean']:.2f}" for r in result["datasets"])
    lines += ["", f"Top-10 agreement with the teacher (mean overlap of the two top-10s): {agreement}."]
    trained_on = (result.get("training") or {}).get("datasets")
    if trained_on:
        lines.append(f"The head was trained on the train splits of {', '.join(trained_on)}; where training used a "
                     "dataset's relevance labels, beating the teacher there is domain adaptation, not retention.")
    if result.get("plot"):
        lines += ["", f"![retrieval quality]({result['plot']})"]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    names = [r["dataset"] for r in result["datasets"]]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6), sharey=True)
    colors = {"teacher": "#4c72b0", "head": "#dd8452", "bm25": "#8c8c8c"}
    width = 0.27
    for ax, metric in zip(axes, METRICS, strict=True):
        for j, side in enumerate(SIDES):
            values = [r["metrics"].get(side, {}).get(metric, 0.0) for r in result["datasets"]]
            ax.bar([i + (j - 1) * width for i in range(len(names))], values, width, label=side, color=colors[side])
        ax.set_title(LABELS[metric], fontsize=10)
        ax.set_xticks(range(len(names)), [n.split("_")[0] for n in names], fontsize=8)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("held-out test split")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_dataset_arguments(parser)
    parser.add_argument("--max-docs", type=int, default=None,
                        help="SMOKE RUNS ONLY: shrink each corpus to the relevant docs + others up to this many.")
    parser.add_argument("--batch-size", type=int, default=32, help="Encode batch size (default: %(default)s).")
    parser.add_argument("--progress", action="store_true", help="Show progress bars.")
    args = parser.parse_args()
    set_threads(args.threads)
    spec = resolve_head(args.head)
    if spec == UNTRAINED:
        print("warning: measuring an UNTRAINED head (no trained head given or found); its quality is meaningless "
              "- use this only to check the script", file=sys.stderr)
    from retrieval_head.evaluation.compare import check_teacher, split_settings

    model, teacher, description = load_model_and_teacher(spec, args.layer, args.head_type)
    fingerprint = check_teacher(model, teacher)
    started = time.perf_counter()
    reports = []
    for name in args.datasets:
        reports.append(evaluate_dataset(name, model, teacher, fingerprint, args))
        r = reports[-1]
        print(f"{name}: " + ", ".join(f"{LABELS[m]} teacher {r['metrics']['teacher'][m]:.3f} head "
                                      f"{r['metrics']['head'][m]:.3f}" for m in METRICS), flush=True)
    smoke = []
    if spec == UNTRAINED:
        smoke.append("the head is untrained")
    if args.max_queries:
        smoke.append(f"at most {args.max_queries} test queries per dataset")
    if args.max_docs:
        smoke.append(f"corpora cut to {args.max_docs} documents")
    result = {
        "benchmark": "quality", "machine": machine_info(),
        "head": {**head_summary(model), "description": description, "spec": spec},
        "training": {k: v for k, v in (model.config.training or {}).items() if k in ("datasets", "losses", "recipe",
                                                                                      "gold_positives", "steps")},
        "split": split_settings(model), "max_queries": args.max_queries, "max_docs": args.max_docs,
        "smoke": "; ".join(smoke) if smoke else None, "datasets": reports,
        "mean_retention": {m: sum(r["retention"].get(m, 0.0) for r in reports) / len(reports) for m in METRICS},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    name = args.name or "quality"
    publish(name, result, markdown, plot, args.results)


if __name__ == "__main__":
    main()
