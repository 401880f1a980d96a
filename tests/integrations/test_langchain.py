"""The LangChain integration passes langchain-tests' standard embeddings suites and retrieves through a real
LangChain vector store: documents from the teacher, queries from the head."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
from core_helpers import make_model
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from retrieval_head.integrations.langchain import RetrievalHeadEmbeddings
from retrieval_head.retrieval.fingerprint import TeacherFingerprint, TeacherMismatchError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_helpers import FakeTeacher  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def tiny_pair() -> tuple:
    """A tiny head whose config records the 16-dim fake teacher, and that teacher."""
    teacher = FakeTeacher()
    fingerprint = TeacherFingerprint.from_sentence_transformer(teacher, teacher_id="fake/teacher")
    return make_model(output_dim=16, teacher=fingerprint.to_dict()), teacher


class TinyPairParams:
    """What both standard suites build: our class on the tiny head and its fake teacher."""

    @property
    def embeddings_class(self) -> type[RetrievalHeadEmbeddings]:
        return RetrievalHeadEmbeddings

    @property
    def embedding_model_params(self) -> dict:
        head, teacher = tiny_pair()
        return {"head": head, "teacher": teacher}


class TestRetrievalHeadEmbeddingsUnit(TinyPairParams, EmbeddingsUnitTests):
    pass


class TestRetrievalHeadEmbeddingsIntegration(TinyPairParams, EmbeddingsIntegrationTests):
    pass


def test_documents_come_from_the_teacher_and_queries_from_the_head() -> None:
    head, teacher = tiny_pair()
    embeddings = RetrievalHeadEmbeddings(head, teacher)
    docs = ["parking near the hotel", "breakfast is included"]
    assert np.allclose(embeddings.embed_documents(docs), teacher.encode(docs), atol=1e-6)
    assert embeddings.embed_query("where can I park") == pytest.approx(head.encode_query("where can I park").tolist())
    assert embeddings.embed_documents([]) == []


def test_a_teacher_from_another_space_is_refused() -> None:
    head, _ = tiny_pair()
    with pytest.raises(TeacherMismatchError, match="Vectors from different teachers are not comparable"):
        RetrievalHeadEmbeddings(head, FakeTeacher(seed=1))


@pytest.mark.real_model
def test_the_shipped_head_retrieves_through_a_langchain_vector_store(embedded_teacher) -> None:
    embeddings = RetrievalHeadEmbeddings(ROOT / "heads" / "smollm2-135m-minilm", embedded_teacher)
    texts = ["The hotel has free parking for guests in the garage under the building.",
             "Breakfast is served from 7 to 10 am and is included in the room price.",
             "Paris is the capital and most populous city of France.",
             "The restaurant offers vegetarian and vegan dishes every evening."]
    store = InMemoryVectorStore.from_texts(texts, embeddings)
    assert store.similarity_search("Is there somewhere to park my car?", k=1)[0].page_content == texts[0]
    assert store.similarity_search("What is the capital of France?", k=1)[0].page_content == texts[2]
