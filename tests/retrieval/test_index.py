"""DocumentIndex: exact/approximate search, JSON+faiss save/load round trip, teacher mismatch refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from retrieval_head.retrieval.data import Query, RetrievalDataset
from retrieval_head.retrieval.fingerprint import TeacherFingerprint, TeacherMismatchError
from retrieval_head.retrieval.index import DocumentIndex


class BagOfWordsTeacher:
    """Tiny deterministic 'teacher': hashed bag of words, L2-normalised (so word overlap = similarity)."""

    similarity_fn_name = "cosine"

    def __init__(self, dim: int = 64, salt: str = "") -> None:
        self.dim, self.salt = dim, salt

    def encode(self, texts, batch_size: int = 32, convert_to_numpy: bool = True, **kwargs) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, int(hashlib.md5((self.salt + word).encode()).hexdigest(), 16) % self.dim] += 1.0
        out[:, -1] += 0.01  # no all-zero rows
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def tiny_dataset() -> RetrievalDataset:
    corpus = {
        "d0": {"title": "Pasta", "text": "a restaurant serving pasta and pizza"},
        "d1": {"title": "Hotel", "text": "a quiet hotel with free parking"},
        "d2": {"title": "Museum", "text": "a museum of modern art"},
        "d3": {"title": "Park", "text": "a park with a lake and ducks"},
    }
    queries = [Query("q0", "where can I eat pizza"), Query("q1", "hotel parking", ("I need a room",))]
    return RetrievalDataset(corpus, queries, {"q0": {"d0": 1}, "q1": {"d1": 1}}, name="tiny")


def test_build_and_search_flat() -> None:
    teacher = BagOfWordsTeacher()
    index = DocumentIndex.build(teacher, tiny_dataset())
    assert len(index) == 4 and index.dim == 64 and index.kind == "flat"
    assert index.fingerprint == TeacherFingerprint.from_sentence_transformer(teacher)
    scores, ids = index.search(teacher.encode(["pizza pasta", "quiet hotel parking"]), k=2)
    assert scores.shape == (2, 2) and ids[0][0] == "d0" and ids[1][0] == "d1"
    assert scores[0, 0] >= scores[0, 1]
    # exact inner product of unit vectors = cosine; unnormalised queries are normalised first
    s2, ids2 = index.search(5.0 * teacher.encode(["pizza pasta"]), k=10)
    assert s2.shape == (1, 4) and ids2[0][0] == "d0" and s2[0, 0] == pytest.approx(scores[0, 0], abs=1e-6)


def test_build_from_mapping_and_dim_check() -> None:
    teacher = BagOfWordsTeacher(dim=32)
    index = DocumentIndex.build(teacher, {"a": "pizza", "b": {"title": "x", "text": "hotel"}})
    assert index.doc_ids == ["a", "b"]
    with pytest.raises(ValueError, match="dim"):
        index.search(np.ones((1, 8), dtype=np.float32), k=1)
    with pytest.raises(TypeError):
        DocumentIndex.build(teacher, ["not", "a", "mapping"])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(200, 16)).astype(np.float32)
    ids = [f"doc-{i}" for i in range(200)]
    index = DocumentIndex.from_embeddings(emb, ids, kind=kind, similarity_fn_name="cosine")
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    before = index.search(queries, k=5)
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "index.json"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["doc_ids"] == ids and meta["kind"] == kind and meta["teacher"] is None
    loaded = DocumentIndex.load(tmp_path / "idx")
    after = loaded.search(queries, k=5)
    assert loaded.doc_ids == ids and loaded.kind == kind
    assert after[1] == before[1]
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6)
    if kind == "flat":  # exact search: brute force agrees
        normed = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        best = np.argmax(queries @ normed.T, axis=1)
        assert [row[0] for row in after[1]] == [ids[i] for i in best]


def test_loaded_index_refuses_another_teacher(tmp_path: Path) -> None:
    teacher, other = BagOfWordsTeacher(), BagOfWordsTeacher(salt="x")
    fp = TeacherFingerprint.from_sentence_transformer(teacher, teacher_id="org/bow")
    DocumentIndex.build(teacher, tiny_dataset(), fingerprint=fp).save(tmp_path)
    loaded = DocumentIndex.load(tmp_path, expected_teacher=fp)
    assert loaded.fingerprint == fp and loaded.fingerprint.teacher_id == "org/bow"
    other_fp = TeacherFingerprint.from_sentence_transformer(other, teacher_id="org/other")
    with pytest.raises(TeacherMismatchError, match="org/bow"):
        loaded.check_teacher(other_fp)
    with pytest.raises(TeacherMismatchError, match="probe_checksum"):
        DocumentIndex.load(tmp_path, expected_teacher=other_fp)


def test_build_refuses_a_fingerprint_of_another_teacher() -> None:
    fp = TeacherFingerprint.from_sentence_transformer(BagOfWordsTeacher(salt="x"))
    with pytest.raises(TeacherMismatchError):
        DocumentIndex.build(BagOfWordsTeacher(), tiny_dataset(), fingerprint=fp)


def test_index_without_fingerprint_cannot_be_vouched_for(tmp_path: Path) -> None:
    index = DocumentIndex.from_embeddings(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    fp = TeacherFingerprint.from_sentence_transformer(BagOfWordsTeacher(dim=3))
    with pytest.raises(TeacherMismatchError, match="records no teacher"):
        index.check_teacher(fp)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="kind"):
        DocumentIndex.from_embeddings(np.eye(3), ["a", "b", "c"], kind="lsh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="supported"):
        DocumentIndex.from_embeddings(np.eye(3), ["a", "b", "c"], similarity_fn_name="euclidean")
    with pytest.raises(ValueError, match="unique"):
        DocumentIndex.from_embeddings(np.eye(3), ["a", "a", "c"])
    with pytest.raises(ValueError, match="does not match"):
        DocumentIndex.from_embeddings(np.eye(3), ["a", "b"])
    with pytest.raises(FileNotFoundError, match="index.json"):
        DocumentIndex.load("/nonexistent/dir")


def test_dot_similarity_keeps_vector_lengths() -> None:
    emb = np.array([[1.0, 0.0], [3.0, 0.0]], dtype=np.float32)
    index = DocumentIndex.from_embeddings(emb, ["small", "big"], similarity_fn_name="dot")
    scores, ids = index.search(np.array([[2.0, 0.0]], dtype=np.float32), k=2)
    assert ids == [["big", "small"]] and scores[0].tolist() == [6.0, 2.0]
