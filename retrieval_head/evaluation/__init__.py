"""Retrieval evaluation: metrics with sentence-transformers' definitions, an index-backed evaluator, BM25."""

from .evaluator import BM25Baseline, RetrievalEvaluator, query_inputs
from .metrics import (
    QueryLoss,
    per_query_metrics,
    rank_scores,
    retention,
    retrieval_metrics,
    topk_overlap,
    worst_queries,
)

__all__ = [
    "BM25Baseline",
    "QueryLoss",
    "RetrievalEvaluator",
    "per_query_metrics",
    "query_inputs",
    "rank_scores",
    "retention",
    "retrieval_metrics",
    "topk_overlap",
    "worst_queries",
]
