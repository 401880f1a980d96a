"""Retrieval evaluation: metrics with sentence-transformers' definitions, an index-backed evaluator, BM25, and the
peers of the quality benchmark (a static model distilled from the teacher, BM25)."""

from retrieval_head.evaluation.evaluator import BM25Baseline, RetrievalEvaluator, query_inputs
from retrieval_head.evaluation.metrics import (
    QueryLoss,
    per_query_metrics,
    rank_scores,
    retention,
    retrieval_metrics,
    topk_overlap,
    worst_queries,
)
from retrieval_head.evaluation.peers import BM25Peer, StaticPeer

__all__ = [
    "BM25Baseline",
    "BM25Peer",
    "QueryLoss",
    "RetrievalEvaluator",
    "StaticPeer",
    "per_query_metrics",
    "query_inputs",
    "rank_scores",
    "retention",
    "retrieval_metrics",
    "topk_overlap",
    "worst_queries",
]
