"""Retrieval metrics with sentence-transformers' `InformationRetrievalEvaluator` definitions.

Definitions (binary relevance: a qrels entry with relevance > 0 is relevant):
- ranking: by descending score, ties broken by ascending document id;
- recall@k = relevant docs in the top k / all relevant docs; accuracy@k = 1 if any relevant doc in top k;
- mrr@k = 1 / rank of the first relevant doc in the top k (0 if none);
- ndcg@k = DCG of the top k (gain 1, discount log2(rank + 1)) / DCG of min(#relevant, k) relevant docs;
- only queries with at least one relevant doc count; the mean is over those queries.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_RECALL_AT: tuple[int, ...] = (1, 5, 10, 100)
Ranked = Mapping[str, Sequence[str]]


def rank_scores(
    scores: Any, query_ids: Sequence[str], doc_ids: Sequence[str], k: int
) -> dict[str, list[str]]:
    """Top-k doc ids per query from a (queries x docs) score matrix, ties broken by ascending doc id."""
    matrix = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
    if matrix.shape != (len(query_ids), len(doc_ids)):
        raise ValueError(f"scores shape {matrix.shape} != (queries, docs) ({len(query_ids)}, {len(doc_ids)})")
    id_rank = np.empty(len(doc_ids), dtype=np.int64)
    id_rank[np.argsort(np.asarray(doc_ids, dtype=object), kind="stable")] = np.arange(len(doc_ids))
    k = min(k, len(doc_ids))
    ranked = {}
    for qid, row in zip(query_ids, matrix, strict=True):
        threshold = np.partition(row, len(row) - k)[len(row) - k]  # k-th largest; keep every tie with it
        cand = np.flatnonzero(row >= threshold)
        order = cand[np.lexsort((id_rank[cand], -row[cand]))][:k]
        ranked[qid] = [doc_ids[i] for i in order]
    return ranked


def sort_hits(doc_ids: Sequence[str], scores: Sequence[float]) -> list[str]:
    """Doc ids re-sorted by (-score, doc id), e.g. to make an index's tie order match the definitions."""
    return [d for _, d in sorted(zip((-float(s) for s in scores), doc_ids, strict=True))]


def _relevant(qrels: Mapping[str, Any], qid: str) -> set[str]:
    rel = qrels.get(qid) or {}
    if isinstance(rel, Mapping):
        return {d for d, r in rel.items() if r > 0}
    return set(rel)


def _dcg(gains: Sequence[int], k: int) -> float:
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))


def per_query_metrics(
    ranked: Ranked,
    qrels: Mapping[str, Any],
    recall_at: Sequence[int] = DEFAULT_RECALL_AT,
    mrr_at: Sequence[int] = (10,),
    ndcg_at: Sequence[int] = (10,),
    accuracy_at: Sequence[int] = (),
) -> dict[str, dict[str, float]]:
    """Query id -> {metric: value} for the ranked queries that have a relevant doc in `qrels`.

    `qrels` maps a query id to {doc id: relevance} or to a set of relevant doc ids.
    """
    out: dict[str, dict[str, float]] = {}
    for qid, hits in ranked.items():
        relevant = _relevant(qrels, qid)
        if not relevant:
            continue
        hits = list(hits)
        gains = [1 if d in relevant else 0 for d in hits]
        first = next((i for i, g in enumerate(gains) if g), None)
        values: dict[str, float] = {}
        for k in recall_at:
            values[f"recall@{k}"] = sum(gains[:k]) / len(relevant)
        for k in accuracy_at:
            values[f"accuracy@{k}"] = float(any(gains[:k]))
        for k in mrr_at:
            values[f"mrr@{k}"] = 1.0 / (first + 1) if first is not None and first < k else 0.0
        for k in ndcg_at:
            values[f"ndcg@{k}"] = _dcg(gains, k) / _dcg([1] * len(relevant), k)
        out[qid] = values
    return out


def retrieval_metrics(
    scores_or_ranked_ids: Any,
    qrels: Mapping[str, Any],
    query_ids: Sequence[str] | None = None,
    doc_ids: Sequence[str] | None = None,
    recall_at: Sequence[int] = DEFAULT_RECALL_AT,
    mrr_at: Sequence[int] = (10,),
    ndcg_at: Sequence[int] = (10,),
    accuracy_at: Sequence[int] = (),
) -> dict[str, float]:
    """Mean metrics ("recall@10", "mrr@10", "ndcg@10", ...) over queries with relevant docs.

    `scores_or_ranked_ids` is one of: a (queries x docs) score matrix (numpy/torch; needs `query_ids` and
    `doc_ids`), a mapping query id -> ranked doc ids, or a sequence of ranked lists aligned with `query_ids`.
    Raises ValueError when no query can be evaluated (rather than returning NaN).
    """
    ranked = as_ranked(
        scores_or_ranked_ids, query_ids, doc_ids, max([*recall_at, *mrr_at, *ndcg_at, *accuracy_at, 1])
    )
    per_query = per_query_metrics(ranked, qrels, recall_at, mrr_at, ndcg_at, accuracy_at)
    if not per_query:
        raise ValueError(
            f"no query to evaluate: {len(ranked)} ranked queries, none with a relevant document in qrels "
            f"({len(qrels)} qrels entries)"
        )
    names = next(iter(per_query.values())).keys()
    return {name: float(np.mean([v[name] for v in per_query.values()])) for name in names}


def as_ranked(
    scores_or_ranked_ids: Any, query_ids: Sequence[str] | None, doc_ids: Sequence[str] | None, k: int
) -> dict[str, list[str]]:
    """Normalise the accepted result forms to query id -> ranked doc ids (top `k` for score matrices)."""
    if isinstance(scores_or_ranked_ids, Mapping):
        return {q: list(v) for q, v in scores_or_ranked_ids.items()}
    if hasattr(scores_or_ranked_ids, "shape") and len(scores_or_ranked_ids.shape) == 2:
        if query_ids is None or doc_ids is None:
            raise ValueError("a score matrix needs query_ids and doc_ids")
        return rank_scores(scores_or_ranked_ids, query_ids, doc_ids, k)
    if query_ids is None:
        raise ValueError("ranked lists given as a sequence need query_ids")
    lists = list(scores_or_ranked_ids)
    if len(lists) != len(query_ids):
        raise ValueError(f"{len(lists)} ranked lists for {len(query_ids)} query ids")
    return {q: list(v) for q, v in zip(query_ids, lists, strict=True)}


def retention(head_metrics: Mapping[str, float], teacher_metrics: Mapping[str, float]) -> dict[str, float]:
    """head / teacher for each metric both have; metrics where the teacher scored 0 are left out (warned)."""
    out = {}
    for name, teacher_value in teacher_metrics.items():
        if name not in head_metrics:
            continue
        if teacher_value == 0:
            logger.warning("retention: teacher %s is 0; ratio left out", name)
            continue
        out[name] = float(head_metrics[name]) / float(teacher_value)
    return out


def topk_overlap(head_ranked: Ranked, teacher_ranked: Ranked, k: int = 10) -> dict[str, float]:
    """Per query: |head top-k ∩ teacher top-k| / k (agreement of the two rankings), for shared queries."""
    return {
        qid: len(set(list(head_ranked[qid])[:k]) & set(list(teacher_ranked[qid])[:k])) / k
        for qid in head_ranked
        if qid in teacher_ranked
    }


@dataclass(frozen=True)
class QueryLoss:
    """A query where the head scores below the teacher on `metric` (loss = teacher - head)."""

    query_id: str
    metric: str
    head: float
    teacher: float

    @property
    def loss(self) -> float:
        return self.teacher - self.head


def worst_queries(
    head_per_query: Mapping[str, Mapping[str, float]],
    teacher_per_query: Mapping[str, Mapping[str, float]],
    metric: str = "ndcg@10",
    n: int = 20,
) -> list[QueryLoss]:
    """The `n` queries the head loses most on vs the teacher (largest teacher - head first; ties by id);
    queries where the head is not worse are left out. Inputs come from `per_query_metrics`."""
    losses = [
        QueryLoss(qid, metric, float(head_per_query[qid][metric]), float(teacher_per_query[qid][metric]))
        for qid in head_per_query
        if qid in teacher_per_query
    ]
    losses = [x for x in losses if x.loss > 0]
    losses.sort(key=lambda x: (-x.loss, x.query_id))
    return losses[:n]
