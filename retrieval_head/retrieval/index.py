"""`DocumentIndex`: documents embedded once by the teacher, searched with faiss, tied to its fingerprint.

Saved as `index.faiss` (faiss.write_index) + `index.json` (doc ids, kind, similarity, fingerprint); no pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from retrieval_head.retrieval.fingerprint import TeacherFingerprint, TeacherMismatchError

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
FORMAT_VERSION = 1
IndexKind = Literal["flat", "hnsw", "ivf"]
SUPPORTED_SIMILARITIES = ("cosine", "dot")


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _documents(dataset_or_docs: Any) -> tuple[list[str], list[str]]:
    """(doc ids, texts) from a RetrievalDataset or a mapping id -> text or {title, text}."""
    if hasattr(dataset_or_docs, "document_texts") and hasattr(dataset_or_docs, "doc_ids"):
        ids = list(dataset_or_docs.doc_ids)
        return ids, list(dataset_or_docs.document_texts(ids))
    if isinstance(dataset_or_docs, Mapping):
        ids = [str(i) for i in dataset_or_docs]
        texts = [
            v if isinstance(v, str) else (v.get("title", "") + " " + v.get("text", "")).strip()
            for v in dataset_or_docs.values()
        ]
        return ids, texts
    raise TypeError(
        f"expected a RetrievalDataset or a mapping id -> text, not {type(dataset_or_docs).__name__}"
    )


class DocumentIndex:
    """Teacher document embeddings in a faiss inner-product index, with their ids and teacher fingerprint."""

    def __init__(
        self,
        index: faiss.Index,
        doc_ids: Sequence[str],
        fingerprint: TeacherFingerprint | None,
        kind: IndexKind = "flat",
        similarity_fn_name: str = "cosine",
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> None:
        if index.ntotal != len(doc_ids):
            raise ValueError(f"faiss index holds {index.ntotal} vectors but got {len(doc_ids)} doc ids")
        if len(set(doc_ids)) != len(doc_ids):
            raise ValueError("doc ids must be unique")
        if similarity_fn_name not in SUPPORTED_SIMILARITIES:
            raise ValueError(
                f"similarity {similarity_fn_name!r} not supported; use one of {SUPPORTED_SIMILARITIES}"
            )
        self.index = index
        self.doc_ids = list(doc_ids)
        self.fingerprint = fingerprint
        self.kind = kind
        self.similarity_fn_name = similarity_fn_name
        self.nprobe = nprobe
        self.ef_search = ef_search
        self._apply_search_params()

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __repr__(self) -> str:
        teacher = self.fingerprint.describe() if self.fingerprint else None
        return f"DocumentIndex(kind={self.kind!r}, docs={len(self)}, dim={self.dim}, teacher={teacher!r})"

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.index.d)

    def _apply_search_params(self) -> None:
        if self.kind == "ivf" and self.nprobe is not None:
            faiss.extract_index_ivf(self.index).nprobe = self.nprobe
        if self.kind == "hnsw" and self.ef_search is not None:
            self.index.hnsw.efSearch = self.ef_search

    @classmethod
    def from_embeddings(
        cls,
        embeddings: Any,
        doc_ids: Sequence[str],
        fingerprint: TeacherFingerprint | None = None,
        kind: IndexKind = "flat",
        similarity_fn_name: str | None = None,
        hnsw_m: int = 32,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 16,
    ) -> DocumentIndex:
        """Index precomputed document embeddings. `kind`: "flat" (exact, default), "hnsw" or "ivf"."""
        sim = similarity_fn_name or (fingerprint.similarity_fn_name if fingerprint else "cosine")
        if sim not in SUPPORTED_SIMILARITIES:
            raise ValueError(f"similarity {sim!r} not supported; use one of {SUPPORTED_SIMILARITIES}")
        x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
        if x.ndim != 2 or len(x) != len(doc_ids):
            raise ValueError(f"embeddings shape {x.shape} does not match {len(doc_ids)} doc ids")
        if fingerprint is not None and x.shape[1] != fingerprint.dim:
            raise TeacherMismatchError(f"embeddings have dim {x.shape[1]}, the teacher has {fingerprint.dim}")
        if sim == "cosine":
            x = np.ascontiguousarray(_normalize(x), dtype=np.float32)
        dim = x.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        elif kind == "ivf":
            nlist = nlist or max(1, min(int(4 * math.sqrt(len(x))), len(x) // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
        else:
            raise ValueError(f"kind must be 'flat', 'hnsw' or 'ivf', got {kind!r}")
        index.add(x)
        return cls(
            index,
            doc_ids,
            fingerprint,
            kind=kind,
            similarity_fn_name=sim,
            nprobe=nprobe if kind == "ivf" else None,
            ef_search=ef_search if kind == "hnsw" else None,
        )

    @classmethod
    def build(
        cls,
        teacher: Any,
        dataset_or_docs: Any,
        fingerprint: TeacherFingerprint | None = None,
        batch_size: int = 64,
        kind: IndexKind = "flat",
        show_progress_bar: bool = False,
        **kind_options: Any,
    ) -> DocumentIndex:
        """Embed the documents (title + " " + text) with the teacher and index them.

        The teacher is fingerprinted; a given `fingerprint` (e.g. one with the Hub id and revision) must match
        it and is the one stored. `kind_options`: hnsw_m, ef_search (hnsw); nlist, nprobe (ivf).
        """
        measured = TeacherFingerprint.from_sentence_transformer(teacher)
        if fingerprint is not None:
            fingerprint.check_matches(measured, what="teacher passed to DocumentIndex.build")
        ids, texts = _documents(dataset_or_docs)
        encode = getattr(teacher, "encode_document", None) or teacher.encode
        embeddings = encode(
            texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=show_progress_bar
        )
        return cls.from_embeddings(
            embeddings,
            ids,
            fingerprint or measured,
            kind=kind,
            similarity_fn_name=measured.similarity_fn_name,
            **kind_options,
        )

    def search(self, query_embeddings: Any, k: int = 10) -> tuple[np.ndarray, list[list[str]]]:
        """Top-k (scores, doc ids) per query. Cosine indexes normalise the queries first.

        Scores are (n_queries, min(k, len)) floats; an approximate index may find fewer than k documents for
        a query: its id list is then shorter and the scores past it are -inf.
        """
        q = query_embeddings
        if hasattr(q, "detach"):
            q = q.detach().float().cpu().numpy()
        q = np.asarray(q, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {q.shape[1]}, the index has {self.dim}")
        if self.similarity_fn_name == "cosine":
            q = _normalize(q)
        k = min(k, len(self))
        scores, idx = self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        scores = np.where(idx >= 0, scores, -np.inf)
        doc_ids = [[self.doc_ids[i] for i in row if i >= 0] for row in idx]
        return scores, doc_ids

    def check_teacher(self, fingerprint: TeacherFingerprint) -> None:
        """Raise `TeacherMismatchError` unless this index was built by the teacher with this fingerprint."""
        if self.fingerprint is None:
            raise TeacherMismatchError(
                f"{self!r} records no teacher, so it cannot be checked against {fingerprint.describe()!r}; "
                "rebuild it with DocumentIndex.build(teacher, corpus) or pass fingerprint= to from_embeddings"
            )
        fingerprint.check_matches(self.fingerprint, what="document index")

    def save(self, directory: str | Path) -> Path:
        """Write `index.faiss` + `index.json` into `directory` (created if needed); returns the directory."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(path / INDEX_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "similarity_fn_name": self.similarity_fn_name,
            "dim": self.dim,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "teacher": self.fingerprint.to_dict() if self.fingerprint else None,
            "doc_ids": self.doc_ids,
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path, expected_teacher: TeacherFingerprint | None = None) -> DocumentIndex:
        """Read an index written by `save`; with `expected_teacher`, refuse one built by another teacher."""
        path = Path(directory)
        missing = [f for f in (INDEX_FILE, META_FILE) if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: missing {', '.join(missing)}; not a DocumentIndex folder")
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path / META_FILE}: format_version {meta['format_version']} > {FORMAT_VERSION}"
            )
        index = faiss.read_index(str(path / INDEX_FILE))
        teacher = TeacherFingerprint.from_dict(meta["teacher"]) if meta.get("teacher") else None
        out = cls(
            index,
            meta["doc_ids"],
            teacher,
            kind=meta["kind"],
            similarity_fn_name=meta["similarity_fn_name"],
            nprobe=meta.get("nprobe"),
            ef_search=meta.get("ef_search"),
        )
        if expected_teacher is not None:
            out.check_teacher(expected_teacher)
        return out
