"""Metrics: hand-computed cases and a cross-check against sentence-transformers' IR evaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from retrieval_head.evaluation.metrics import (
    per_query_metrics,
    rank_scores,
    retention,
    retrieval_metrics,
    sort_hits,
    topk_overlap,
    worst_queries,
)


def test_hand_computed_single_query() -> None:
    ranked = {"q": ["a", "x", "b", "y", "z"]}
    qrels = {"q": {"a": 1, "b": 1, "c": 1, "n": 0}}  # relevance 0 does not count
    m = retrieval_metrics(ranked, qrels, recall_at=(1, 5), mrr_at=(10,), ndcg_at=(10,), accuracy_at=(1,))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["mrr@10"] == pytest.approx(1.0)
    assert m["accuracy@1"] == 1.0
    dcg = 1 + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)


def test_mean_over_queries_and_mrr_cutoff() -> None:
    ranked = {"q1": ["x"] * 10 + ["a"], "q2": ["y", "b"], "q3": ["c"]}
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"zz": 0}}  # q3 has no relevant doc: skipped
    m = retrieval_metrics(ranked, qrels, recall_at=(10, 100))
    assert m["mrr@10"] == pytest.approx((0 + 0.5) / 2)  # q1's hit is at rank 11
    assert m["recall@10"] == pytest.approx(0.5) and m["recall@100"] == pytest.approx(1.0)
    assert set(m) == {"recall@10", "recall@100", "mrr@10", "ndcg@10"}


def test_qrels_as_sets_and_sequence_input() -> None:
    m = retrieval_metrics([["b", "a"]], {"q": {"a"}}, query_ids=["q"], recall_at=(1,))
    assert m["recall@1"] == 0.0 and m["mrr@10"] == 0.5


def test_zero_queries_is_an_error_not_nan() -> None:
    with pytest.raises(ValueError, match="no query to evaluate"):
        retrieval_metrics({"q": ["a"]}, {"other": {"a": 1}})
    with pytest.raises(ValueError, match="no query to evaluate"):
        retrieval_metrics({}, {})


def test_rank_scores_breaks_ties_by_doc_id() -> None:
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    ranked = rank_scores(scores, ["q"], ["d4", "d9", "d2", "d3", "d0"], k=3)
    assert ranked == {"q": ["d9", "d2", "d3"]}
    assert sort_hits(["z", "a", "m"], [0.5, 0.5, 0.7]) == ["m", "a", "z"]
    with pytest.raises(ValueError, match="shape"):
        rank_scores(scores, ["q", "r"], ["a"] * 5, k=3)
    with pytest.raises(ValueError, match="query_ids and doc_ids"):
        retrieval_metrics(scores, {"q": {"d9": 1}})


def test_retention_overlap_and_worst_queries(caplog: pytest.LogCaptureFixture) -> None:
    r = retention({"ndcg@10": 0.3, "recall@1": 0.1, "only_head": 1.0}, {"ndcg@10": 0.4, "recall@1": 0.0})
    assert r == {"ndcg@10": pytest.approx(0.75)}
    assert "recall@1" in caplog.text
    head = {"q1": list("abcdefghij"), "q2": list("abcdefghij"), "q3": ["a"]}
    teacher = {"q1": list("abcdefghij"), "q2": list("abcdeklmno")}
    assert topk_overlap(head, teacher, k=10) == {"q1": 1.0, "q2": 0.5}
    qrels = {"q1": {"a": 1}, "q2": {"k": 1}}
    hp, tp = per_query_metrics(head, qrels), per_query_metrics(teacher, qrels)
    worst = worst_queries(hp, tp, metric="mrr@10", n=5)
    assert [w.query_id for w in worst] == ["q2"]
    assert worst[0].head == 0.0 and worst[0].teacher == pytest.approx(1 / 6) and worst[0].loss > 0


class PrecomputedModel:
    """Hands InformationRetrievalEvaluator precomputed query embeddings (in its query order)."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        self.embeddings = embeddings

    def encode_query(self, sentences, **kwargs) -> torch.Tensor:
        assert len(sentences) == len(self.embeddings)
        return self.embeddings


def test_matches_sentence_transformers_information_retrieval_evaluator() -> None:
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import dot_score

    rng = np.random.default_rng(0)
    n_q, n_d = 30, 120
    doc_ids = [f"d{i:03d}" for i in rng.permutation(n_d)]  # id order differs from position
    query_ids = [f"q{i}" for i in range(n_q)]
    # small integer vectors -> exact score ties, so the tie-breaking rule is exercised too
    q_emb = rng.integers(-2, 3, size=(n_q, 4)).astype(np.float32)
    d_emb = rng.integers(-2, 3, size=(n_d, 4)).astype(np.float32)
    qrels = {
        q: {d: 1 for d in rng.choice(doc_ids, size=rng.integers(1, 5), replace=False)} for q in query_ids
    }
    qrels["q0"] = {}  # a query with no relevant docs is skipped by both
    ks = [1, 5, 10, 100]
    evaluator = InformationRetrievalEvaluator(
        queries={q: f"text {q}" for q in query_ids},
        corpus={d: f"doc {d}" for d in doc_ids},
        relevant_docs={q: set(v) for q, v in qrels.items()},
        mrr_at_k=[10],
        ndcg_at_k=[10],
        accuracy_at_k=[1, 5],
        precision_recall_at_k=ks,
        map_at_k=[100],
        score_functions={"dot": dot_score},
        corpus_chunk_size=37,  # several chunks, as on a large corpus
    )
    kept = [query_ids.index(q) for q in evaluator.queries_ids]
    st = evaluator.compute_all_metrics(
        PrecomputedModel(torch.from_numpy(q_emb[kept])), corpus_embeddings=torch.from_numpy(d_emb)
    )["dot"]
    ours = retrieval_metrics(q_emb @ d_emb.T, qrels, query_ids, doc_ids, recall_at=ks, accuracy_at=(1, 5))
    for k in ks:
        assert ours[f"recall@{k}"] == pytest.approx(st["recall@k"][k], abs=1e-12)
    for k in (1, 5):
        assert ours[f"accuracy@{k}"] == pytest.approx(st["accuracy@k"][k], abs=1e-12)
    assert ours["mrr@10"] == pytest.approx(st["mrr@k"][10], abs=1e-12)
    assert ours["ndcg@10"] == pytest.approx(st["ndcg@k"][10], abs=1e-12)
    assert 0 < ours["ndcg@10"] < 1
