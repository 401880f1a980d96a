"""`compare_head_and_teacher`: head vs teacher vs BM25 on one dataset, with tiny models written to disk."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from eval_helpers import load_teacher, write_dataset, write_head, write_teacher

from retrieval_head import RetrievalModel
from retrieval_head.evaluation.compare import (
    compare_head_and_teacher,
    format_report,
    head_inputs,
    held_out,
    split_settings,
    teacher_texts,
)
from retrieval_head.retrieval.data import Query, RetrievalDataset, load_dataset_folder
from retrieval_head.retrieval.fingerprint import TeacherFingerprint, TeacherMismatchError
from retrieval_head.retrieval.index import DocumentIndex


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("compare")
    teacher_dir = write_teacher(root / "teacher")
    head_dir = write_head(root / "head", teacher_dir, root / "base")
    return SimpleNamespace(
        data=load_dataset_folder(write_dataset(root / "data")),
        teacher=load_teacher(teacher_dir),
        other_teacher=load_teacher(write_teacher(root / "other", seed=1)),
        model=RetrievalModel.from_pretrained(head_dir),
    )


class TeacherAsHead:
    """A 'head' that embeds the dialogue text with the teacher itself: it must retain 100%."""

    def __init__(self, teacher, fingerprint: TeacherFingerprint) -> None:
        self.teacher = teacher
        self.config = SimpleNamespace(teacher=fingerprint.to_dict(), training=None)

    def encode_query(self, conversations, **kwargs):
        return self.teacher.encode([" ".join(m["content"] for m in c) for c in conversations], **kwargs)


def test_report_of_a_real_head(world: SimpleNamespace) -> None:
    report = compare_head_and_teacher(world.model, world.teacher, world.data, worst=3)
    assert report["queries"] == 30 and report["documents"] == 12 and report["conversational"]
    metrics = report["metrics"]
    assert set(metrics) == {"head", "teacher", "bm25"}
    for side in metrics.values():
        assert set(side) == {"recall@1", "recall@5", "recall@10", "recall@100", "mrr@10", "ndcg@10"}
        assert all(0.0 <= v <= 1.0 for v in side.values())
    assert metrics["bm25"]["recall@1"] == 1.0  # the tiny queries share their doc's words
    for name, kept in report["retention"].items():
        assert kept == pytest.approx(metrics["head"][name] / metrics["teacher"][name])
    assert 0.0 <= report["agreement"]["top10_overlap_mean"] <= 1.0
    assert len(report["worst_queries"]) <= 3
    for w in report["worst_queries"]:
        assert w["loss"] == pytest.approx(w["teacher"] - w["head"]) and w["loss"] > 0
    assert report["teacher"]["teacher_id"] == world.model.config.teacher["teacher_id"]
    table = format_report(report)
    for label in ("nDCG@10", "R@1", "R@5", "R@10", "R@100", "MRR@10", "retained", "top-10 agreement"):
        assert label in table


def test_the_teacher_as_its_own_head_retains_everything(world: SimpleNamespace) -> None:
    fingerprint = TeacherFingerprint.from_sentence_transformer(world.teacher)
    report = compare_head_and_teacher(TeacherAsHead(world.teacher, fingerprint), world.teacher, world.data,
                                      bm25=False)
    assert "bm25" not in report["metrics"]
    assert all(v == pytest.approx(1.0) for v in report["retention"].values())
    assert report["agreement"]["top10_overlap_mean"] == pytest.approx(1.0)
    assert report["worst_queries"] == [] and report["queries_head_worse"] == 0


def test_precomputed_head_embeddings_and_a_reused_index(world: SimpleNamespace) -> None:
    index = DocumentIndex.build(world.teacher, world.data)
    queries = [q for q in world.data.queries if q.id in world.data.relevant_docs()]
    emb = world.model.encode_query(head_inputs(queries))
    a = compare_head_and_teacher(world.model, world.teacher, world.data, index=index, head_embeddings=emb)
    b = compare_head_and_teacher(world.model, world.teacher, world.data, index=index)
    assert a["metrics"] == b["metrics"]
    assert "index_build" not in a["timings_s"] and "head_queries" not in a["timings_s"]


def test_another_teacher_is_refused(world: SimpleNamespace) -> None:
    with pytest.raises(TeacherMismatchError):
        compare_head_and_teacher(world.model, world.other_teacher, world.data)
    foreign = DocumentIndex.build(world.other_teacher, world.data)
    with pytest.raises(TeacherMismatchError):
        compare_head_and_teacher(world.model, world.teacher, world.data, index=foreign)


def test_an_index_of_another_corpus_is_refused(world: SimpleNamespace) -> None:
    fingerprint = TeacherFingerprint.from_dict(world.model.config.teacher)
    small = DocumentIndex.build(world.teacher, {"d0": "hotel"}, fingerprint=fingerprint)
    with pytest.raises(ValueError, match="lacks 11 of the dataset's documents"):
        compare_head_and_teacher(world.model, world.teacher, world.data, index=small)


def test_no_evaluable_query_is_an_error(world: SimpleNamespace) -> None:
    unlabeled = RetrievalDataset(world.data.corpus, [Query("x", "hotel")], {}, name="none")
    with pytest.raises(ValueError, match="no query with a relevant document"):
        compare_head_and_teacher(world.model, world.teacher, unlabeled)


def test_teacher_texts_cut_the_oldest_words_and_keep_the_question(world: SimpleNamespace) -> None:
    history = tuple(f"turn {i} about the hotel pool and the garden view" for i in range(6))
    long, short = Query("long", "does it have wifi?", history), Query("short", "wifi", ())
    texts, cut = teacher_texts([long, short], world.teacher, max_tokens=16)
    assert cut == 1 and texts[1] == "wifi"
    assert texts[0].endswith("does it have wifi?") and long.flat_text().endswith(texts[0])
    assert len(world.teacher.tokenizer(texts[0])["input_ids"]) <= 16
    assert long.flat_text()[-len(texts[0]) - 1] == " "  # starts on a word boundary
    no_cut, n = teacher_texts([long], SimpleNamespace(tokenizer=None, max_seq_length=None))
    assert n == 0 and no_cut == [long.flat_text()]


def test_held_out_is_the_recorded_split(world: SimpleNamespace) -> None:
    assert split_settings(None) == {"dev": 0.1, "test": 0.2, "seed": 0}
    assert held_out(world.data).query_ids == world.data.split().test.query_ids
    recorded = SimpleNamespace(config=SimpleNamespace(training={"split": {"dev": 0.2, "test": 0.3, "seed": 1}}))
    assert held_out(world.data, recorded).query_ids == world.data.split(0.2, 0.3, seed=1).test.query_ids
    assert held_out(world.data, recorded, "dev").query_ids == world.data.split(0.2, 0.3, seed=1).dev.query_ids
    with pytest.raises(ValueError, match="'train'"):
        held_out(world.data, part="train")


def test_head_inputs_are_chat_messages(world: SimpleNamespace) -> None:
    q = Query("q", "does it have parking?", ("I want the Quiet Inn", "Sure."))
    assert head_inputs([q]) == [[{"role": "user", "content": "I want the Quiet Inn"},
                                 {"role": "assistant", "content": "Sure."},
                                 {"role": "user", "content": "does it have parking?"}]]
    assert np.asarray(world.model.encode_query(head_inputs([q]))).shape == (1, 16)


def test_missing_dataset_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "corpus.jsonl").write_text('{"id": "d0", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match="queries.jsonl, qrels.tsv"):
        load_dataset_folder(tmp_path)
