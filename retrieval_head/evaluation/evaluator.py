"""`RetrievalEvaluator` (query embeddings + a `DocumentIndex` -> metrics) and a BM25 floor."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from retrieval_head.evaluation.metrics import (
    DEFAULT_RECALL_AT,
    per_query_metrics,
    rank_scores,
    retrieval_metrics,
    sort_hits,
)
from retrieval_head.retrieval.data import Query, RetrievalDataset
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.retrieval.index import DocumentIndex

try:  # sentence-transformers >= 6
    from sentence_transformers.base.evaluation.evaluator import BaseEvaluator
except ImportError:  # pragma: no cover - sentence-transformers 5
    from sentence_transformers.evaluation import SentenceEvaluator as BaseEvaluator

QueryFormat = str | Callable[[Query], Any]
_TOKEN = re.compile(r"\w+")


def query_inputs(
    queries: Sequence[Query], query_format: QueryFormat = "flat", max_words: int | None = None
) -> list:
    """What to encode per query: "flat" (history + question, left-truncated to `max_words`), "question"
    (the question alone), "messages" (chat messages), or a callable Query -> input."""
    if callable(query_format):
        return [query_format(q) for q in queries]
    if query_format == "flat":
        return [q.flat_text(max_words) for q in queries]
    if query_format == "question":
        return [q.text for q in queries]
    if query_format == "messages":
        return [q.as_messages() for q in queries]
    raise ValueError(f"query_format must be flat, question, messages or a callable, got {query_format!r}")


class RetrievalEvaluator(BaseEvaluator):
    """Recall@k / MRR@10 / nDCG@10 of query embeddings against a teacher-built document index.

    Like sentence-transformers' `InformationRetrievalEvaluator` (same metric definitions, only queries with a
    relevant doc count, `primary_metric` = ndcg@10), but documents come from a `DocumentIndex` built by the
    teacher, and queries can be embedded by any model (a head) via `evaluate(query_embeddings)`.
    """

    def __init__(
        self,
        dataset: RetrievalDataset,
        index: DocumentIndex | None = None,
        recall_at: Sequence[int] = DEFAULT_RECALL_AT,
        mrr_at: Sequence[int] = (10,),
        ndcg_at: Sequence[int] = (10,),
        accuracy_at: Sequence[int] = (),
        query_format: QueryFormat = "flat",
        max_words: int | None = None,
        batch_size: int = 32,
        name: str = "",
        expected_teacher: TeacherFingerprint | None = None,
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.relevant_docs = dataset.relevant_docs()
        self.queries = [q for q in dataset.queries if q.id in self.relevant_docs]
        if not self.queries:
            raise ValueError(f"{dataset!r} has no query with a relevant document; nothing to evaluate")
        self.query_ids = [q.id for q in self.queries]
        self.recall_at, self.mrr_at, self.ndcg_at = tuple(recall_at), tuple(mrr_at), tuple(ndcg_at)
        self.accuracy_at = tuple(accuracy_at)
        self.max_k = max([*self.recall_at, *self.mrr_at, *self.ndcg_at, *self.accuracy_at, 1])
        self.query_format = query_format
        self.max_words = max_words
        self.batch_size = batch_size
        self.name = name
        self.expected_teacher = expected_teacher
        self.index = index
        if index is not None and expected_teacher is not None:
            index.check_teacher(expected_teacher)
        self.primary_metric = f"ndcg@{max(self.ndcg_at)}" if self.ndcg_at else f"recall@{max(self.recall_at)}"

    def query_inputs(self) -> list:
        """The inputs to embed, aligned with `self.query_ids`."""
        return query_inputs(self.queries, self.query_format, self.max_words)

    def _index(self, index: DocumentIndex | None) -> DocumentIndex:
        index = index or self.index
        if index is None:
            raise ValueError("no DocumentIndex: pass index= here or to RetrievalEvaluator(...)")
        if self.expected_teacher is not None:
            index.check_teacher(self.expected_teacher)
        return index

    def rank(self, query_embeddings: Any, index: DocumentIndex | None = None) -> dict[str, list[str]]:
        """Query id -> top `max_k` doc ids (ties by doc id), for embeddings aligned with `query_ids`."""
        if len(query_embeddings) != len(self.query_ids):
            raise ValueError(f"{len(query_embeddings)} query embeddings for {len(self.query_ids)} queries")
        scores, doc_ids = self._index(index).search(query_embeddings, self.max_k)
        return {
            qid: sort_hits(ids, row[: len(ids)])
            for qid, ids, row in zip(self.query_ids, doc_ids, scores, strict=True)
        }

    def _metric_kwargs(self) -> dict[str, Any]:
        return {
            "recall_at": self.recall_at,
            "mrr_at": self.mrr_at,
            "ndcg_at": self.ndcg_at,
            "accuracy_at": self.accuracy_at,
        }

    def evaluate(self, query_embeddings: Any, index: DocumentIndex | None = None) -> dict[str, float]:
        """Mean metrics, e.g. {"recall@10": ..., "mrr@10": ..., "ndcg@10": ...} (no name prefix)."""
        return retrieval_metrics(
            self.rank(query_embeddings, index), self.relevant_docs, **self._metric_kwargs()
        )

    def per_query(
        self, query_embeddings: Any, index: DocumentIndex | None = None
    ) -> dict[str, dict[str, float]]:
        """Query id -> its metrics (for `worst_queries` and per-conversation analysis)."""
        return per_query_metrics(
            self.rank(query_embeddings, index), self.relevant_docs, **self._metric_kwargs()
        )

    def embed_queries(self, model: Any) -> np.ndarray:
        """Embed the query inputs with `model.encode_query` (or `encode`)."""
        encode = getattr(model, "encode_query", None) or model.encode
        return np.asarray(encode(self.query_inputs(), batch_size=self.batch_size, convert_to_numpy=True))

    def __call__(
        self,
        model: Any,
        output_path: str | None = None,
        epoch: int = -1,
        steps: int = -1,
        *args: Any,
        **kwargs: Any,
    ) -> dict[str, float]:
        """Embed the queries with `model` and evaluate. With no index yet, `model` is taken to be the teacher
        and indexes the corpus itself. Keys get a `name` prefix when set (sentence-transformers style)."""
        if self.index is None:
            self.index = DocumentIndex.build(model, self.dataset, batch_size=self.batch_size)
        metrics = self.evaluate(self.embed_queries(model))
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        if getattr(model, "model_card_data", None) is not None:
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens for BM25."""
    return _TOKEN.findall(text.lower())


class BM25Baseline:
    """BM25 (rank-bm25's BM25Okapi scoring, exact) over title + text: the floor a dense model must beat.

    rank-bm25's `get_scores` loops in Python over every document per query token; here its idf and length
    normalisation are laid out as one sparse doc x term matrix, so scoring a query is a single product.
    """

    def __init__(
        self, dataset: RetrievalDataset, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25
    ) -> None:
        from rank_bm25 import BM25Okapi
        from scipy.sparse import csr_matrix

        self.doc_ids = dataset.doc_ids
        tokenized = [tokenize(t) for t in dataset.document_texts(self.doc_ids)]
        self.bm25 = BM25Okapi(tokenized, k1=k1, b=b, epsilon=epsilon)
        self.vocab = {t: i for i, t in enumerate(sorted(self.bm25.idf))}
        rows, cols, vals = [], [], []
        for d, (freqs, length) in enumerate(zip(self.bm25.doc_freqs, self.bm25.doc_len, strict=True)):
            norm = k1 * (1 - b + b * length / self.bm25.avgdl)
            for term, tf in freqs.items():
                rows.append(d)
                cols.append(self.vocab[term])
                vals.append(self.bm25.idf[term] * tf * (k1 + 1) / (tf + norm))
        self.weights = csr_matrix((vals, (rows, cols)), shape=(len(self.doc_ids), len(self.vocab)))

    def scores(self, query_text: str) -> np.ndarray:
        """BM25 score of every document (corpus order) for one query; equals BM25Okapi.get_scores."""
        counts = np.zeros(len(self.vocab))
        for token in tokenize(query_text):
            if token in self.vocab:
                counts[self.vocab[token]] += 1
        return np.asarray(self.weights @ counts).ravel()

    def rank(
        self,
        queries: Sequence[Query],
        k: int = 100,
        query_format: QueryFormat = "flat",
        max_words: int | None = None,
    ) -> dict[str, list[str]]:
        """Query id -> top-k doc ids (ties by doc id)."""
        texts = query_inputs(queries, query_format, max_words)
        matrix = np.stack([self.scores(t) for t in texts]) if texts else np.zeros((0, len(self.doc_ids)))
        return rank_scores(matrix, [q.id for q in queries], self.doc_ids, k)

    def evaluate(
        self,
        dataset: RetrievalDataset,
        query_format: QueryFormat = "flat",
        max_words: int | None = None,
        **metric_kwargs: Any,
    ) -> dict[str, float]:
        """Mean metrics of BM25 on `dataset`'s queries (same keys as `RetrievalEvaluator.evaluate`)."""
        recall_at = metric_kwargs.get("recall_at", DEFAULT_RECALL_AT)
        k = max(
            [
                *recall_at,
                *metric_kwargs.get("mrr_at", (10,)),
                *metric_kwargs.get("ndcg_at", (10,)),
                *metric_kwargs.get("accuracy_at", ()),
            ]
        )
        return retrieval_metrics(
            self.rank(dataset.queries, k, query_format, max_words), dataset.qrels, **metric_kwargs
        )
