"""A Qdrant home for the teacher's document vectors: embedded on one machine, a server or cluster beyond it.

`QdrantClient(path=...)` runs Qdrant in-process (no server); the same code with `QdrantClient(url=...)` talks
to a Qdrant server or cluster (`pip install retrieval-head[qdrant]`). The teacher's fingerprint is stored in
the collection's metadata and checked whenever a head searches it, as `DocumentIndex` does: a head trained
against another teacher is refused with `TeacherMismatchError`, never searched silently wrong.

    store = QdrantDocumentStore.build(QdrantClient(path="qdrant"), "docs", teacher, dataset)
    scores, doc_ids = store.search(model, ["where can I park?"], k=10)   # queries: the head
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models
from tqdm.auto import tqdm

from retrieval_head.retrieval.fingerprint import TeacherFingerprint, TeacherMismatchError
from retrieval_head.retrieval.index import _documents

TEACHER_KEY = "retrieval_head_teacher"
DISTANCES = {"cosine": models.Distance.COSINE, "dot": models.Distance.DOT, "euclidean": models.Distance.EUCLID,
             "manhattan": models.Distance.MANHATTAN}


def point_id(doc_id: str) -> str:
    """A stable Qdrant point id (a UUID) for a document id of any form."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"retrieval-head:{doc_id}"))


class QdrantDocumentStore:
    """A Qdrant collection of teacher document vectors (payload: `doc_id`), tied to the teacher's fingerprint."""

    def __init__(self, client: QdrantClient, collection: str) -> None:
        if not client.collection_exists(collection):
            raise ValueError(f"Qdrant has no collection {collection!r}; create it with QdrantDocumentStore.build().")
        self.client, self.collection = client, collection
        metadata = client.get_collection(collection).config.metadata or {}
        recorded = metadata.get(TEACHER_KEY)
        self.fingerprint = TeacherFingerprint.from_dict(recorded) if recorded else None

    @classmethod
    def build(cls, client: QdrantClient, collection: str, teacher: Any, dataset_or_docs: Any,
              fingerprint: TeacherFingerprint | None = None, batch_size: int = 64,
              show_progress_bar: bool = True) -> QdrantDocumentStore:
        """Embed the documents with the teacher in batches and upload them to a new collection `collection`."""
        if client.collection_exists(collection):
            raise ValueError(f"Qdrant already has a collection {collection!r}; open it with "
                             f"QdrantDocumentStore(client, {collection!r}) or choose another name.")
        measured = TeacherFingerprint.from_sentence_transformer(teacher)
        if fingerprint is not None:
            fingerprint.check_matches(measured, what="teacher passed to QdrantDocumentStore.build")
        fingerprint = fingerprint or measured
        ids, texts = _documents(dataset_or_docs)
        client.create_collection(
            collection, vectors_config=models.VectorParams(size=fingerprint.dim,
                                                           distance=DISTANCES[fingerprint.similarity_fn_name]),
            metadata={TEACHER_KEY: fingerprint.to_dict()})
        encode = getattr(teacher, "encode_document", None) or teacher.encode
        for start in tqdm(range(0, len(texts), batch_size), desc="Embedding documents", disable=not show_progress_bar):
            vectors = encode(texts[start : start + batch_size], batch_size=batch_size, convert_to_numpy=True)
            client.upload_points(collection, [
                models.PointStruct(id=point_id(doc_id), vector=vector.tolist(), payload={"doc_id": doc_id})
                for doc_id, vector in zip(ids[start : start + batch_size], np.asarray(vectors), strict=True)
            ], wait=True)
        return cls(client, collection)

    def __len__(self) -> int:
        return self.client.count(self.collection, exact=True).count

    def check_teacher(self, fingerprint: TeacherFingerprint) -> None:
        """Raise `TeacherMismatchError` unless the collection was built by the teacher with this fingerprint."""
        if self.fingerprint is None:
            raise TeacherMismatchError(
                f"Qdrant collection {self.collection!r} records no teacher, so it cannot be checked against "
                f"{fingerprint.describe()!r}; rebuild it with QdrantDocumentStore.build(client, name, teacher, docs)."
            )
        fingerprint.check_matches(self.fingerprint, what=f"Qdrant collection {self.collection!r}")

    def search(self, model: Any, queries: Sequence[Any], k: int = 10, exact: bool = False,
               **encode_kwargs: Any) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k (scores, doc ids) for queries embedded by the head (`encode_query`), teacher checked first.

        `exact=True` searches every vector (Qdrant's exact mode): the same top-k as a flat `DocumentIndex`.
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}.")
        if not model.config.teacher:
            raise TeacherMismatchError("the head records no teacher (config.teacher); it cannot be checked against "
                                       f"Qdrant collection {self.collection!r}.")
        self.check_teacher(TeacherFingerprint.from_dict(model.config.teacher))
        vectors = np.atleast_2d(model.encode_query(list(queries), convert_to_numpy=True, **encode_kwargs))
        return self.search_vectors(vectors, k, exact)

    def search_vectors(self, vectors: np.ndarray, k: int = 10,
                       exact: bool = False) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k (scores, doc ids) for query vectors already in the teacher's space."""
        params = models.SearchParams(exact=True) if exact else None  # embedded Qdrant is always exact
        scores, ids = [], []
        for vector in np.atleast_2d(np.asarray(vectors, dtype=np.float32)):
            hits = self.client.query_points(self.collection, query=vector.tolist(), limit=k, search_params=params,
                                            with_payload=True).points
            ids.append([h.payload["doc_id"] for h in hits])
            scores.append([h.score for h in hits] + [-np.inf] * (k - len(hits)))
        width = min(k, max((len(r) for r in ids), default=0))
        return np.asarray([s[:width] for s in scores], dtype=np.float32), ids
