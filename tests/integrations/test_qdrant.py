"""Qdrant document store: teacher vectors in an embedded Qdrant, fingerprint checked, same top-10 as faiss."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from core_helpers import make_model
from qdrant_client import QdrantClient

from retrieval_head.integrations.qdrant import QdrantDocumentStore
from retrieval_head.retrieval.fingerprint import TeacherFingerprint, TeacherMismatchError
from retrieval_head.retrieval.index import DocumentIndex

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_helpers import WORDS, FakeTeacher  # noqa: E402

DOCS = {f"d{i}": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(6)) for i in range(40)}
QUERIES = ["where can I park my car", "breakfast in the room price", "vegetarian food outdoor", "pets allowed"]


@pytest.fixture
def pair():
    teacher = FakeTeacher()
    fingerprint = TeacherFingerprint.from_sentence_transformer(teacher, teacher_id="fake/teacher")
    return make_model(output_dim=16, teacher=fingerprint.to_dict()), teacher


def test_exact_search_equals_the_flat_faiss_index_and_survives_a_reopen(pair, tmp_path) -> None:
    model, teacher = pair
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    store = QdrantDocumentStore.build(client, "docs", teacher, DOCS, batch_size=16, show_progress_bar=False)
    assert len(store) == len(DOCS)
    index = DocumentIndex.build(teacher, DOCS)
    queries = model.encode_query(QUERIES)
    faiss_scores, faiss_ids = index.search(queries, k=10)
    scores, ids = store.search(model, QUERIES, k=10, exact=True)
    assert ids == faiss_ids
    np.testing.assert_allclose(scores, faiss_scores, atol=1e-5)
    client.close()
    reopened = QdrantDocumentStore(QdrantClient(path=str(tmp_path / "qdrant")), "docs")
    assert reopened.fingerprint == store.fingerprint
    assert reopened.search(model, QUERIES[:1], k=3, exact=True)[1] == [faiss_ids[0][:3]]


def test_a_head_of_another_teacher_is_refused(pair, tmp_path) -> None:
    model, teacher = pair
    store = QdrantDocumentStore.build(QdrantClient(path=str(tmp_path / "q")), "docs", teacher, DOCS,
                                      show_progress_bar=False)
    other = TeacherFingerprint.from_sentence_transformer(FakeTeacher(seed=1), teacher_id="other/teacher")
    with pytest.raises(TeacherMismatchError, match="Qdrant collection 'docs'"):
        store.search(make_model(output_dim=16, teacher=other.to_dict()), QUERIES, k=5)
    with pytest.raises(TeacherMismatchError, match="records no teacher"):
        store.search(make_model(output_dim=16), QUERIES, k=5)


def test_bad_collections_and_k_are_clear_errors(pair, tmp_path) -> None:
    model, teacher = pair
    client = QdrantClient(path=str(tmp_path / "q"))
    with pytest.raises(ValueError, match="no collection 'missing'"):
        QdrantDocumentStore(client, "missing")
    store = QdrantDocumentStore.build(client, "docs", teacher, DOCS, show_progress_bar=False)
    with pytest.raises(ValueError, match="already has a collection 'docs'"):
        QdrantDocumentStore.build(client, "docs", teacher, DOCS, show_progress_bar=False)
    with pytest.raises(ValueError, match="k must be positive"):
        store.search(model, QUERIES, k=0)
    scores, ids = store.search(model, QUERIES[:1], k=100, exact=True)  # k past the collection: all of it
    assert len(ids[0]) == len(DOCS) and scores.shape == (1, len(DOCS))
