"""Head vs teacher (and BM25 as a floor) on one dataset: the report behind `retrieval-head eval` and benchmarks.

Documents are embedded once by the teacher into a `DocumentIndex` tied to its fingerprint; both query sides
search that same index. The two query sides read a conversation the way each model can:
- the teacher gets `Query.flat_text()` (history + question joined with spaces) with the OLDEST words cut so the
  whole input fits its `max_seq_length` (256 tokens for all-MiniLM-L6-v2) - truncating the end instead would
  drop the question itself;
- the head gets `Query.as_messages()`: the dialogue as chat messages, rendered with the LM's template.
BM25 scores the teacher's text.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from retrieval_head.evaluation.evaluator import BM25Baseline, RetrievalEvaluator
from retrieval_head.evaluation.metrics import per_query_metrics, retention, topk_overlap, worst_queries
from retrieval_head.retrieval.data import Query, RetrievalDataset
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.retrieval.index import DocumentIndex

logger = logging.getLogger(__name__)

TABLE_METRICS = ("ndcg@10", "recall@1", "recall@5", "recall@10", "recall@100", "mrr@10")
LABELS = {
    "ndcg@10": "nDCG@10", "recall@1": "R@1", "recall@5": "R@5", "recall@10": "R@10", "recall@100": "R@100",
    "mrr@10": "MRR@10",
}


def head_fingerprint(model: Any) -> TeacherFingerprint | None:
    """The teacher fingerprint recorded in a head's config (None when it records none)."""
    info = getattr(getattr(model, "config", None), "teacher", None)
    return TeacherFingerprint.from_dict(info) if info else None


def check_teacher(model: Any, teacher: Any) -> TeacherFingerprint:
    """The fingerprint to index with: the head's recorded one, checked against `teacher` (raises
    `TeacherMismatchError` when the teacher embeds differently); the teacher's own when the head records none."""
    measured = TeacherFingerprint.from_sentence_transformer(teacher)
    expected = head_fingerprint(model)
    if expected is None:
        logger.warning("The head records no teacher fingerprint; comparing against %s unchecked",
                       measured.describe())
        return measured
    expected.check_matches(measured, what="teacher given for the comparison")
    return expected


def split_settings(model: Any) -> dict[str, Any]:
    """The train/dev/test split the head was trained with (its config's `training.split`), else the defaults
    `RetrievalDataset.split` and the default recipe use (dev 0.1, test 0.2, seed 0)."""
    recorded = (getattr(getattr(model, "config", None), "training", None) or {}).get("split") or {}
    return {"dev": float(recorded.get("dev", 0.1)), "test": float(recorded.get("test", 0.2)),
            "seed": int(recorded.get("seed", 0))}


def held_out(dataset: RetrievalDataset, model: Any = None, part: str = "test") -> RetrievalDataset:
    """The test (or `part="dev"`) split of `dataset` under the head's split settings: queries training held out."""
    if part not in ("test", "dev"):
        raise ValueError(f"part={part!r}: choose 'test' or 'dev'")
    s = split_settings(model)
    return getattr(dataset.split(dev_fraction=s["dev"], test_fraction=s["test"], seed=s["seed"]), part)


def teacher_texts(queries: Sequence[Query], teacher: Any, max_tokens: int | None = None) -> tuple[list[str], int]:
    """(what the teacher embeds per query, how many were cut): the question alone, or history + question
    joined with spaces with the oldest words cut to fit the teacher's window - the same texts training gives
    the teacher (`training.teacher_cache.teacher_query_text`).

    The window is `max_tokens` or the teacher's `max_seq_length`, special tokens included. Without a fast
    tokenizer on the teacher the texts are returned whole (the teacher then truncates them itself).
    """
    from retrieval_head.retrieval.teacher import teacher_max_tokens, teacher_query_text

    tokenizer = getattr(teacher, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        texts = [q.flat_text() if q.history else q.text for q in queries]
        return texts, 0
    limit = teacher_max_tokens(teacher, max_tokens)
    texts = [teacher_query_text(q, tokenizer, limit) for q in queries]
    cut = sum(text != q.flat_text() for q, text in zip(queries, texts, strict=True) if q.history)
    return texts, cut


def head_inputs(queries: Sequence[Query]) -> list[list[dict[str, str]]]:
    """What the head embeds per query: the dialogue as chat messages (one user message without history)."""
    return [q.as_messages() for q in queries]


def _encode(model: Any, inputs: list, batch_size: int, show_progress_bar: bool) -> np.ndarray:
    encode = getattr(model, "encode_query", None) or model.encode
    return np.asarray(encode(inputs, batch_size=batch_size, convert_to_numpy=True,
                             show_progress_bar=show_progress_bar), dtype=np.float32)


def compare_head_and_teacher(
    model: Any,
    teacher: Any,
    dataset: RetrievalDataset,
    *,
    index: DocumentIndex | None = None,
    fingerprint: TeacherFingerprint | None = None,
    bm25: bool = True,
    worst: int = 10,
    worst_metric: str = "ndcg@10",
    batch_size: int = 32,
    teacher_max_tokens: int | None = None,
    head_embeddings: Any = None,
    show_progress_bar: bool = False,
) -> dict[str, Any]:
    """Evaluate a head (`model.encode_query`) and its teacher on `dataset`'s queries against one teacher-built
    document index, with BM25 as a floor. Returns a JSON-able report:

    `{"dataset", "queries", "documents", "conversational", "teacher", "index", "metrics": {"head", "teacher",
    "bm25"}, "retention", "agreement": {"top10_overlap_mean", ...}, "worst_queries": [...], "timings_s",
    "teacher_inputs_cut"}`.

    `index`: reuse a built index (it must hold the dataset's documents and carry the teacher's fingerprint);
    `fingerprint`: the expected teacher (default: the head's recorded one, checked against `teacher`);
    `head_embeddings`: precomputed head query embeddings aligned with the evaluated queries (skips encoding).
    Raises ValueError when no query has a relevant document, `TeacherMismatchError` on a foreign index/teacher.
    """
    timings: dict[str, float] = {}
    expected = fingerprint or check_teacher(model, teacher)
    start = time.perf_counter()
    if index is None:
        index = DocumentIndex.build(teacher, dataset, fingerprint=expected, batch_size=batch_size,
                                    show_progress_bar=show_progress_bar)
        timings["index_build"] = time.perf_counter() - start
    missing = set(dataset.doc_ids) - set(index.doc_ids)
    if missing:
        raise ValueError(f"the index lacks {len(missing)} of the dataset's documents (e.g. {sorted(missing)[:3]}); "
                         "it was built for another corpus: rebuild it")
    evaluator = RetrievalEvaluator(dataset, index, name=dataset.name, batch_size=batch_size,
                                   expected_teacher=expected)
    queries = evaluator.queries
    texts, cut = teacher_texts(queries, teacher, teacher_max_tokens)

    start = time.perf_counter()
    teacher_emb = _encode(teacher, texts, batch_size, show_progress_bar)
    timings["teacher_queries"] = time.perf_counter() - start
    start = time.perf_counter()
    if head_embeddings is None:
        head_emb = _encode(model, head_inputs(queries), batch_size, show_progress_bar)
        timings["head_queries"] = time.perf_counter() - start
    else:
        head_emb = np.asarray(head_embeddings.detach().cpu() if hasattr(head_embeddings, "detach")
                              else head_embeddings, dtype=np.float32)

    head_ranked, teacher_ranked = evaluator.rank(head_emb), evaluator.rank(teacher_emb)
    metric_kwargs = evaluator._metric_kwargs()
    head_pq = per_query_metrics(head_ranked, evaluator.relevant_docs, **metric_kwargs)
    teacher_pq = per_query_metrics(teacher_ranked, evaluator.relevant_docs, **metric_kwargs)
    metrics = {"head": _mean(head_pq), "teacher": _mean(teacher_pq)}
    if bm25:
        start = time.perf_counter()
        by_id = dict(zip(evaluator.query_ids, texts, strict=True))
        floor = BM25Baseline(dataset)
        metrics["bm25"] = floor.evaluate(dataset.subset(evaluator.query_ids), query_format=lambda q: by_id[q.id],
                                         **metric_kwargs)
        timings["bm25"] = time.perf_counter() - start

    overlap = topk_overlap(head_ranked, teacher_ranked, k=10)
    values = list(overlap.values())
    report: dict[str, Any] = {
        "dataset": dataset.name,
        "queries": len(queries),
        "documents": len(dataset.corpus),
        "conversational": dataset.is_conversational,
        "teacher": expected.to_dict(),
        "index": {"kind": index.kind, "documents": len(index), "dim": index.dim},
        "head_inputs": "chat messages (history + question)" if dataset.is_conversational else "question",
        "teacher_inputs": "history + question, oldest words cut to fit the teacher's window",
        "teacher_inputs_cut": cut,
        "metrics": metrics,
        "retention": retention(metrics["head"], metrics["teacher"]),
        "agreement": {
            "top10_overlap_mean": float(np.mean(values)),
            "top10_overlap_median": float(statistics.median(values)),
            "top1_same": float(np.mean([head_ranked[q][:1] == teacher_ranked[q][:1] for q in evaluator.query_ids])),
        },
        "worst_queries": [
            {"query_id": w.query_id, "text": dataset.query(w.query_id).text, "metric": w.metric,
             "head": w.head, "teacher": w.teacher, "loss": w.loss, "top10_overlap": overlap.get(w.query_id),
             "history_turns": len(dataset.query(w.query_id).history)}
            for w in worst_queries(head_pq, teacher_pq, worst_metric, worst)
        ],
        "worst_metric": worst_metric,
        "queries_head_worse": sum(head_pq[q][worst_metric] < teacher_pq[q][worst_metric] for q in head_pq),
        "queries_head_better": sum(head_pq[q][worst_metric] > teacher_pq[q][worst_metric] for q in head_pq),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    return report


def _mean(per_query: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    if not per_query:
        raise ValueError("no query to evaluate")
    names = next(iter(per_query.values())).keys()
    return {name: float(np.mean([v[name] for v in per_query.values()])) for name in names}


def format_report(report: Mapping[str, Any], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """A plain-text table of a `compare_head_and_teacher` report: one row per metric, then agreement and the
    queries the head loses most on."""
    m = report["metrics"]
    sides = [s for s in ("head", "teacher", "bm25") if s in m]
    lines = [
        f"{report['dataset']}: {report['queries']} queries, {report['documents']} documents"
        + (" (conversational)" if report.get("conversational") else ""),
        f"{'metric':<9}" + "".join(f"{s:>9}" for s in sides) + f"{'retained':>10}",
    ]
    for name in metrics:
        if name not in m["head"]:
            continue
        kept = report["retention"].get(name)
        lines.append(f"{LABELS.get(name, name):<9}" + "".join(f"{m[s][name]:>9.3f}" for s in sides)
                     + f"{'-' if kept is None else f'{100 * kept:.1f}%':>10}")
    a = report["agreement"]
    lines.append(f"top-10 agreement with the teacher: mean {a['top10_overlap_mean']:.3f}, median "
                 f"{a['top10_overlap_median']:.3f}; same top-1: {100 * a['top1_same']:.1f}%")
    lines.append(f"head worse than the teacher on {report['queries_head_worse']} queries, better on "
                 f"{report['queries_head_better']} ({LABELS.get(report['worst_metric'], report['worst_metric'])})")
    if report.get("teacher_inputs_cut"):
        lines.append(f"teacher inputs cut from the left to fit its window: {report['teacher_inputs_cut']}")
    if report["worst_queries"]:
        lines.append(f"queries the head loses most on (teacher -> head, "
                     f"{LABELS.get(report['worst_metric'], report['worst_metric'])}):")
        for w in report["worst_queries"]:
            text = w["text"] if len(w["text"]) <= 70 else w["text"][:67] + "..."
            lines.append(f"  {w['query_id']:<16} {w['teacher']:.3f} -> {w['head']:.3f}  "
                         f"({w['history_turns']} turns)  {text}")
    return "\n".join(lines)
