"""Retrieval quality: teacher vs head vs BM25 on the held-out test split of every bundled dataset.

For each dataset the teacher embeds the whole corpus into a flat (exact) index, kept in `--index-dir` and reused
(the documents' embeddings come from `--embeddings`, training's cache, when the same teacher embedded them);
the test split is the one training holds out (`RetrievalDataset.split()` with the split recorded in the head's
config, else the defaults dev 0.1 / test 0.2 / seed 0). The teacher embeds each query as history + question cut
from the left to fit its 256 tokens, the head reads the dialogue as chat messages (see
`retrieval_head.evaluation.compare`). Reports nDCG@10, R@10, MRR@10 and retention (head / teacher).

Beside them, two peers that embed or score queries AND documents themselves (`retrieval_head.evaluation.peers`):
a static model distilled from the same teacher (a reproduction of model2vec's `distill`: PCA 256, Zipf/SIF
weights; the table is cached under `--peer-cache`, keyed by the teacher's fingerprint) and BM25 over title + text,
both reading the teacher's query text. For each: the same metrics, retention vs the teacher, and the median time of
one query at batch 1 (static: embedding it; BM25: scoring the corpus), measured in turn with the teacher's batch-1
`encode` of the same texts. `--no-peers` leaves them out (BM25 then comes from the comparison itself).
Writes benchmarks/results/quality.{json,md,png}. Usage:

    .venv/bin/python benchmarks/quality.py [--head DIR] [--datasets NAME ...] [--max-queries N] [--no-peers]
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
    ROOT,
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
    summarize,
)

METRICS = ("ndcg@10", "recall@10", "mrr@10")
LABELS = {"ndcg@10": "nDCG@10", "recall@10": "R@10", "mrr@10": "MRR@10"}
SIDES = ("teacher", "head", "bm25")
PEERS = ("static", "bm25")
PEER_LABELS = {"static": "static (distilled, model2vec-style)", "bm25": "BM25"}
PLOT_SIDES = ("teacher", "head", "static", "bm25")


def shrink_corpus(dataset: Any, max_docs: int) -> Any:
    """Smoke runs only: the evaluated queries' relevant documents plus the first others, up to `max_docs`."""
    from retrieval_head.retrieval.data import RetrievalDataset

    keep = {d for docs in dataset.relevant_docs().values() for d in docs}
    for doc_id in dataset.doc_ids:
        if len(keep) >= max_docs:
            break
        keep.add(doc_id)
    corpus = {d: dataset.corpus[d] for d in dataset.doc_ids if d in keep}
    return RetrievalDataset(corpus, dataset.queries, dataset.qrels, name=dataset.name)


def embedding_cache(folder: str) -> Any:
    """The teacher embedding cache: `folder` (read and written) over the shipped one (read only); None for ''."""
    from retrieval_head.io.tensor_cache import LayeredCache

    return LayeredCache(folder, [DATA / "teacher-embeddings"]) if folder else None


def load_static_peer(teacher: Any, fingerprint: Any, folder: str) -> tuple[Any, float]:
    """(the static peer distilled from `teacher`, seconds it took): read from the `folder` cache when the same
    teacher was distilled before ('' = never cache)."""
    from retrieval_head.evaluation.peers import StaticPeer
    from retrieval_head.io.tensor_cache import TensorCache

    start = time.perf_counter()
    with torch.inference_mode():
        static = StaticPeer.distill(teacher, fingerprint=fingerprint, cache=TensorCache(folder) if folder else None)
    return static, round(time.perf_counter() - start, 2)


def evaluate_peers(test: Any, teacher: Any, static: Any, report: dict, latency_queries: int) -> dict[str, Any]:
    """Static and BM25 peers on `test` with the teacher's query texts: metrics, retention vs the teacher, build
    time; batch-1 query latency of both and of the teacher, measured in turn on the same texts."""
    from retrieval_head.evaluation.compare import teacher_texts
    from retrieval_head.evaluation.metrics import retention
    from retrieval_head.evaluation.peers import BM25Peer, batch1_latency

    relevant = test.relevant_docs()
    queries = [q for q in test.queries if q.id in relevant]
    texts, _ = teacher_texts(queries, teacher)
    by_id = dict(zip([q.id for q in queries], texts, strict=True))
    teacher_metrics = report["metrics"]["teacher"]
    peers: dict[str, Any] = {}
    start = time.perf_counter()
    bm25 = BM25Peer(test)
    built = time.perf_counter() - start
    peers["bm25"] = {"metrics": bm25.evaluate(test, by_id), "build_s": round(built, 2),
                     "query_step": "score every document (tokenise + one sparse product)"}
    start = time.perf_counter()
    index = static.index(test)
    built = time.perf_counter() - start
    peers["static"] = {"metrics": static.evaluate(test, by_id, index=index), "build_s": round(built, 2),
                       "query_step": "embed the query (tokenise + mean of token rows + normalise)",
                       "dim": static.dim, "tokens": len(static.token_ids), "settings": static.settings}
    sample = texts[:latency_queries]
    seconds = batch1_latency({
        "teacher": lambda t: teacher.encode([t], batch_size=1, convert_to_numpy=True, show_progress_bar=False),
        "static": lambda t: static.encode([t]),
        "bm25": bm25.scores,
    }, sample)
    latency = {name: summarize(s) for name, s in seconds.items()}
    for name, peer in peers.items():
        peer["retention"] = retention(peer["metrics"], teacher_metrics)
        peer["query_ms"] = latency[name]
        peer["speedup_vs_teacher"] = latency["teacher"]["median_ms"] / latency[name]["median_ms"]
    peers["teacher_query_ms"] = latency["teacher"]
    peers["latency_queries"] = len(sample)
    return peers


def evaluate_dataset(name: str, model: Any, teacher: Any, fingerprint: Any, args: argparse.Namespace,
                     static: Any = None) -> dict:
    from retrieval_head.commands.eval import load_or_build_index, sample_queries
    from retrieval_head.evaluation.compare import compare_head_and_teacher, held_out
    from retrieval_head.retrieval.data import load_dataset_folder

    dataset = load_dataset_folder(Path(args.data_root) / name)
    test = sample_queries(held_out(dataset, model, args.split), args.max_queries)
    index_dir = Path(args.index_dir) / name if args.index_dir else None
    if args.max_docs:
        test = shrink_corpus(test, args.max_docs)
        index_dir = None  # a reduced corpus is never cached
    start = time.perf_counter()
    index, how = load_or_build_index(index_dir, teacher, test, fingerprint, show_progress_bar=args.progress,
                                     cache=embedding_cache(args.embeddings))
    with torch.inference_mode():
        report = compare_head_and_teacher(model, teacher, test, index=index, fingerprint=fingerprint,
                                          bm25=static is None, batch_size=args.batch_size,
                                          show_progress_bar=args.progress)
    report["dataset"] = name
    report["index"]["source"] = how
    report["index_s"] = round(time.perf_counter() - start - sum(report["timings_s"].values()), 2)
    if static is not None:
        with torch.inference_mode():
            report["peers"] = evaluate_peers(test, teacher, static, report, args.latency_queries)
        report["metrics"]["bm25"] = report["peers"]["bm25"]["metrics"]  # the same BM25 as compare's own
        report["metrics"]["static"] = report["peers"]["static"]["metrics"]
    return report


def markdown(result: dict[str, Any]) -> str:
    head = result["head"]
    part = result["split"].get("part", "test")
    lines = [
        f"## Retrieval quality, {head['head_type']} head (held-out {part} splits"
        + ("" if result.get("dtype", "float32") == "float32" else f", base in {result['dtype']}") + ")",
        "",
        f"Head: {head['description']}; teacher {head['teacher']}. {part.capitalize()} split: "
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
    if result.get("peers"):
        lines += ["", *peer_table(result)]
    if result.get("plot"):
        lines += ["", f"![retrieval quality]({result['plot']})"]
    return "\n".join(lines)


def peer_table(result: dict[str, Any]) -> list[str]:
    """The peers beside the teacher and the head: metrics, retention and batch-1 query time per dataset."""
    static = result["peers"]["static"]
    lines = [
        "### Peers: a static model distilled from the teacher, and BM25",
        "",
        f"Static: the teacher distilled model2vec-style (a reproduction of model2vec's `distill`: every one of "
        f"{static['tokens']} vocabulary tokens through the teacher, PCA to {static['dim']} dims, Zipf/SIF weights; "
        f"distilled in {static['distill_s']} s, {static['source']}); BM25: rank-bm25's BM25Okapi over title + text. "
        "Both embed or score the queries (the teacher's text: history + question) and the documents themselves. "
        "Query ms: median of one query at batch 1 (teacher: `encode`; static: embedding it; BM25: scoring every "
        "document), the three timed in turn on the same test queries in this process.",
        "",
        "| dataset | model | nDCG@10 / R@10 / MRR@10 | retained " + " / ".join(LABELS[m] for m in METRICS)
        + " | query ms (batch 1) | vs teacher |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in result["datasets"]:
        m, peers = r["metrics"], r["peers"]
        rows = [("teacher", m["teacher"], None, peers["teacher_query_ms"]["median_ms"]),
                ("head", m["head"], r["retention"], None)]
        rows += [(PEER_LABELS[p], peers[p]["metrics"], peers[p]["retention"], peers[p]["query_ms"]["median_ms"])
                 for p in PEERS]
        teacher_ms = peers["teacher_query_ms"]["median_ms"]
        for label, values, kept, ms in rows:
            kept_cells = "—" if kept is None else " / ".join(
                f"{100 * kept[x]:.0f}%" if x in kept else "—" for x in METRICS)
            speed = "—" if ms is None else f"{teacher_ms / ms:.1f}x"
            lines.append(f"| {r['dataset']} | {label} | {' / '.join(fmt(values[x]) for x in METRICS)} | "
                         f"{kept_cells} | {'—' if ms is None else f'{ms:.3f}'} | {speed} |")
    means = result["peers"]["mean_retention"]
    for label, key in (("head", "head"), *((PEER_LABELS[p], p) for p in PEERS)):
        lines.append(f"| **mean retention** | {label} | | "
                     + " / ".join(f"**{100 * means[key][x]:.0f}%**" for x in METRICS) + " | | |")
    margin = result["peers"]["head_margin_over_static_ndcg@10"]
    lines += ["", f"Margin of the head over the static peer (mean nDCG@10 retention, head minus static): "
              f"**{100 * margin:+.1f} points** ({100 * means['head']['ndcg@10']:.1f}% vs "
              f"{100 * means['static']['ndcg@10']:.1f}%). The head's own query time is in `latency.md` (it reads the "
              "agent LM's states, not text)."]
    return lines


def plot(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    names = [r["dataset"] for r in result["datasets"]]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6), sharey=True)
    colors = {"teacher": "#4c72b0", "head": "#dd8452", "static": "#55a868", "bm25": "#8c8c8c"}
    sides = [s for s in PLOT_SIDES if any(s in r["metrics"] for r in result["datasets"])]
    width = 0.8 / len(sides)
    for ax, metric in zip(axes, METRICS, strict=True):
        for j, side in enumerate(sides):
            values = [r["metrics"].get(side, {}).get(metric, 0.0) for r in result["datasets"]]
            ax.bar([i + (j - (len(sides) - 1) / 2) * width for i in range(len(names))], values, width, label=side,
                   color=colors[side])
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
    parser.add_argument("--split", choices=("test", "dev"), default="test",
                        help="Held-out split measured: test (reported once) or dev (for choices; default: test).")
    parser.add_argument("--batch-size", type=int, default=32, help="Encode batch size (default: %(default)s).")
    parser.add_argument("--progress", action="store_true", help="Show progress bars.")
    parser.add_argument("--no-peers", action="store_true",
                        help="Leave out the static and BM25 peer rows (BM25 then comes from the comparison).")
    parser.add_argument("--peer-cache", default=str(ROOT / ".cache" / "peers"),
                        help="Where the distilled static table is kept ('' to never save; default: %(default)s).")
    parser.add_argument("--latency-queries", type=int, default=50,
                        help="Test queries timed at batch 1 per dataset (default: %(default)s).")
    args = parser.parse_args()
    set_threads(args.threads)
    spec = resolve_head(args.head)
    if spec == UNTRAINED:
        print("warning: measuring an UNTRAINED head (no trained head given or found); its quality is meaningless "
              "- use this only to check the script", file=sys.stderr)
    from retrieval_head.evaluation.compare import check_teacher, split_settings

    model, teacher, description = load_model_and_teacher(spec, args.layer, args.head_type, dtype=args.dtype)
    fingerprint = check_teacher(model, teacher)
    started = time.perf_counter()
    static, distill_s = (None, None) if args.no_peers else load_static_peer(teacher, fingerprint, args.peer_cache)
    reports = []
    for name in args.datasets:
        reports.append(evaluate_dataset(name, model, teacher, fingerprint, args, static))
        r = reports[-1]
        print(f"{name}: " + ", ".join(f"{LABELS[m]} teacher {r['metrics']['teacher'][m]:.3f} head "
                                      f"{r['metrics']['head'][m]:.3f}" for m in METRICS)
              + ("" if static is None else f"; nDCG@10 static {r['metrics']['static']['ndcg@10']:.3f} "
                 f"bm25 {r['metrics']['bm25']['ndcg@10']:.3f}"), flush=True)
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
        "split": {**split_settings(model), "part": args.split}, "dtype": args.dtype,
        "max_queries": args.max_queries, "max_docs": args.max_docs,
        "smoke": "; ".join(smoke) if smoke else None, "datasets": reports,
        "mean_retention": {m: sum(r["retention"].get(m, 0.0) for r in reports) / len(reports) for m in METRICS},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if static is not None:
        means = {side: {m: sum(r["peers"][side]["retention"].get(m, 0.0) for r in reports) / len(reports)
                        for m in METRICS} for side in PEERS}
        means["head"] = result["mean_retention"]
        margin = means["head"]["ndcg@10"] - means["static"]["ndcg@10"]
        result["peers"] = {
            "static": {"distill_s": distill_s, "dim": static.dim, "tokens": len(static.token_ids),
                       "settings": static.settings, "cache": args.peer_cache or None,
                       "source": static.source},
            "bm25": {"implementation": "rank-bm25 BM25Okapi (k1 1.5, b 0.75, epsilon 0.25) via BM25Baseline"},
            "mean_retention": means, "head_margin_over_static_ndcg@10": margin,
        }
        print(f"head mean nDCG@10 retention {100 * means['head']['ndcg@10']:.1f}% vs static peer "
              f"{100 * means['static']['ndcg@10']:.1f}%: margin {100 * margin:+.1f} points", flush=True)
    name = args.name or "quality"
    publish(name, result, markdown, plot, args.results)


if __name__ == "__main__":
    main()
