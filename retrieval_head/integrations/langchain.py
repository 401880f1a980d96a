"""LangChain `Embeddings` with this product's split: documents by the teacher, queries by the head.

LangChain separates `embed_documents` from `embed_query`; a vector store built with the teacher keeps its index,
and the query side moves into the agent's LM (`pip install retrieval-head[langchain]`):

    from retrieval_head.integrations.langchain import RetrievalHeadEmbeddings
    embeddings = RetrievalHeadEmbeddings("heads/smollm2-135m-minilm")  # the teacher the head records
    store = InMemoryVectorStore.from_texts(texts, embeddings)          # documents: the teacher
    store.similarity_search("where can I park?")                       # the query: the head

The async pair (`aembed_documents` / `aembed_query`) is LangChain's default: the same calls in an executor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings

from retrieval_head.core.model import RetrievalModel
from retrieval_head.retrieval.fingerprint import TeacherFingerprint


def load_recorded_teacher(model: RetrievalModel) -> Any:
    """The sentence-transformers teacher the head's config names (the embedded one offline)."""
    from retrieval_head.io.embedded import load_teacher_by_id

    recorded = model.config.teacher or {}
    if not recorded.get("teacher_id"):
        raise ValueError("the head records no teacher (config.teacher); pass teacher= (a SentenceTransformer).")
    return load_teacher_by_id(recorded["teacher_id"], recorded.get("revision"))


class RetrievalHeadEmbeddings(Embeddings):
    """`embed_documents` = the teacher's `encode_document`; `embed_query` = the head's `encode_query`.

    `head`: a `RetrievalModel`, a head folder or a Hub id. `teacher`: a `SentenceTransformer` or its id (default:
    the teacher the head was trained against). The teacher is fingerprinted and must be the head's: vectors from
    another teacher's space would be searched silently wrong, so a mismatch raises `TeacherMismatchError`.
    """

    def __init__(self, head: RetrievalModel | str | Path, teacher: Any = None, batch_size: int = 32) -> None:
        self.model = head if isinstance(head, RetrievalModel) else RetrievalModel.from_pretrained(head)
        if teacher is None:
            teacher = load_recorded_teacher(self.model)
        elif isinstance(teacher, str | Path):
            from retrieval_head.io.embedded import load_teacher_by_id

            teacher = load_teacher_by_id(str(teacher))
        self.teacher = teacher
        self.batch_size = batch_size
        if self.model.config.teacher:
            expected = TeacherFingerprint.from_dict(self.model.config.teacher)
            expected.check_matches(TeacherFingerprint.from_sentence_transformer(teacher), what="teacher given")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """The teacher's document vectors (its document prompt, if it has one)."""
        if not texts:
            return []
        encode = getattr(self.teacher, "encode_document", None) or self.teacher.encode
        return encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        """The head's query vector, from the agent LM's own hidden states."""
        return self.model.encode_query(text, convert_to_numpy=True).tolist()
