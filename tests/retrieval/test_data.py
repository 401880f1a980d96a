"""Dataset loading/validation, conversational inputs, and leak-free deterministic splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval_head.retrieval.data import DataFormatError, Query, RetrievalDataset, load_dataset_folder

DATA = Path(__file__).resolve().parents[2] / "data"


def write_folder(path: Path, corpus=None, queries=None, qrels=None) -> Path:
    """A small valid dataset folder; pass a str to replace a file's raw content, None to keep the default."""
    path.mkdir(parents=True, exist_ok=True)
    corpus = (
        corpus
        if corpus is not None
        else [
            {"id": "d1", "title": "Alpha", "text": "first doc"},
            {"id": "d2", "title": "", "text": "second doc "},
            {"id": "d3", "title": "Gamma", "text": "third doc"},
        ]
    )
    queries = (
        queries
        if queries is not None
        else [
            {"id": "q1", "text": "which first?", "history": []},
            {
                "id": "q2",
                "text": "and the second?",
                "history": ["hi", "hello"],
                "history_speakers": ["U", "S"],
            },
        ]
    )
    qrels = qrels if qrels is not None else "q1\td1\t1\nq2\td2\t1\nq2\td3\t0\n"
    for name, content in (("corpus.jsonl", corpus), ("queries.jsonl", queries), ("qrels.tsv", qrels)):
        text = content if isinstance(content, str) else "".join(json.dumps(r) + "\n" for r in content)
        (path / name).write_text(text, encoding="utf-8")
    return path


def test_load_valid_folder(tmp_path: Path) -> None:
    ds = load_dataset_folder(write_folder(tmp_path / "tiny"))
    assert ds.name == "tiny" and len(ds) == 2 and ds.doc_ids == ["d1", "d2", "d3"]
    assert ds.document_text("d1") == "Alpha first doc"
    assert ds.document_text("d2") == "second doc"  # stripped when the title is empty
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 0}}
    assert ds.relevant_docs() == {"q1": {"d1"}, "q2": {"d2"}}
    assert ds.query("q2").history == ("hi", "hello")
    assert ds.query("q2").flat_text() == "hi hello and the second?"


def test_beir_header_in_qrels_is_skipped(tmp_path: Path) -> None:
    ds = load_dataset_folder(write_folder(tmp_path, qrels="query-id\tcorpus-id\tscore\nq1\td1\t1\n"))
    assert ds.qrels == {"q1": {"d1": 1}}


def test_missing_files_are_named(tmp_path: Path) -> None:
    folder = write_folder(tmp_path)
    (folder / "qrels.tsv").unlink()
    (folder / "corpus.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"corpus\.jsonl, qrels\.tsv"):
        load_dataset_folder(folder)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"corpus": '{"id": "d1", "text": "x"}\n{"id": "d2", "text": \n'},
            r"corpus\.jsonl:2: malformed JSON",
        ),
        (
            {"queries": '{"id": "q1", "text": "x"}\n\n{"id": "q2"}\n'},
            r"queries\.jsonl:3: missing field.*text",
        ),
        ({"queries": "[1, 2]\n"}, r"queries\.jsonl:1: expected a JSON object"),
        ({"corpus": ""}, r"corpus\.jsonl: file is empty"),
        ({"qrels": "\n"}, r"qrels\.tsv: file is empty"),
        ({"qrels": "q1\td1\t1\nq9\td1\t1\n"}, r"qrels\.tsv:2: query id 'q9'"),
        ({"qrels": "q1\td1\t1\nq1\tdX\t1\n"}, r"qrels\.tsv:2: document id 'dX'"),
        ({"qrels": "q1\td1\n"}, r"qrels\.tsv:1: expected 3 tab-separated columns"),
        ({"qrels": "q1\td1\t1\nq1\td2\thigh\n"}, r"qrels\.tsv:2: relevance 'high'"),
        ({"queries": [{"id": "q1", "text": "a"}, {"id": "q1", "text": "b"}]}, r"queries\.jsonl:2: duplicate"),
        ({"queries": [{"id": "q1", "text": "a", "history": "not a list"}]}, r"queries\.jsonl:1: .*history"),
        (
            {"queries": [{"id": "q1", "text": "a", "history": ["x"], "history_speakers": ["U", "S"]}]},
            r"queries\.jsonl:1: history_speakers",
        ),
    ],
)
def test_malformed_input_errors_name_file_and_line(tmp_path: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(DataFormatError, match=pattern):
        load_dataset_folder(write_folder(tmp_path, **kwargs))


def test_as_messages_uses_speakers_and_ends_with_the_question() -> None:
    q = Query(
        "val-1",
        "Is it quiet?",
        ("Find a hotel", "Hobsons House fits.", "Book it", "Done."),
        ("U", "S", "U", "S"),
    )
    assert q.as_messages() == [
        {"role": "user", "content": "Find a hotel"},
        {"role": "assistant", "content": "Hobsons House fits."},
        {"role": "user", "content": "Book it"},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "Is it quiet?"},
    ]
    assert q.as_messages(system="Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_as_messages_without_speakers_alternates_back_from_the_question() -> None:
    q = Query("x", "q?", ("a", "b", "c"))
    assert [m["role"] for m in q.as_messages()] == ["assistant", "user", "assistant", "user"]
    assert Query("y", "only").as_messages() == [{"role": "user", "content": "only"}]


def test_as_messages_merges_consecutive_same_role_turns() -> None:
    q = Query("x", "q?", ("a", "b"), ("S", "U"))
    assert q.as_messages() == [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b\nq?"}]


def test_flat_text_truncates_from_the_left() -> None:
    q = Query("x", "where is it", ("one two", "three  four"))
    assert q.flat_text() == "one two three four where is it"
    assert q.flat_text(max_words=4) == "four where is it"
    assert q.flat_text(max_words=100) == q.flat_text()
    with pytest.raises(ValueError):
        q.flat_text(max_words=0)


def _gold_overlap(a: RetrievalDataset, b: RetrievalDataset) -> set[str]:
    gold = lambda ds: {d for rel in ds.relevant_docs().values() for d in rel}  # noqa: E731
    return gold(a) & gold(b)


@pytest.fixture(scope="module")
def dstc() -> RetrievalDataset:
    path = DATA / "dstc11_track5_val_reviewdoc"
    if not path.is_dir():
        pytest.skip("DSTC11 data not present")
    return load_dataset_folder(path)


def test_conversation_split_keeps_dialogues_together(dstc: RetrievalDataset) -> None:
    train, dev, test = dstc.split(dev_fraction=0.1, test_fraction=0.2, seed=0)
    assert len(train) + len(dev) + len(test) == len(dstc)
    assert abs(len(test) - 0.2 * len(dstc)) <= 5 and abs(len(dev) - 0.1 * len(dstc)) <= 5
    firsts = [{q.history[0] for q in part} for part in (train, dev, test)]
    assert not (firsts[0] & firsts[1] or firsts[0] & firsts[2] or firsts[1] & firsts[2])
    assert train.corpus is dstc.corpus and test.corpus is dstc.corpus
    assert set(test.qrels) == set(test.query_ids)
    assert train.name.endswith("train") and test.name.endswith("test")


def test_split_is_deterministic_and_seeded(dstc: RetrievalDataset) -> None:
    a = dstc.split(0.1, 0.2, seed=7)
    b = dstc.split(0.1, 0.2, seed=7)
    c = dstc.split(0.1, 0.2, seed=8)
    assert a.test.query_ids == b.test.query_ids and a.dev.query_ids == b.dev.query_ids
    assert a.test.query_ids != c.test.query_ids


def test_document_split_never_shares_gold_docs(tmp_path: Path) -> None:
    path = DATA / "covidqa"
    if not path.is_dir():
        pytest.skip("COVID-QA data not present")
    ds = load_dataset_folder(path)
    train, dev, test = ds.split(0.1, 0.2, seed=0)  # auto: by document for single-turn data
    assert not _gold_overlap(train, test) and not _gold_overlap(train, dev) and not _gold_overlap(dev, test)
    assert len(train) + len(dev) + len(test) == len(ds) and len(test) > 0.15 * len(ds)


def test_document_grouping_is_transitive_and_small_fractions_may_be_empty(tmp_path: Path) -> None:
    corpus = [{"id": f"d{i}", "title": "", "text": str(i)} for i in range(6)]
    queries = [{"id": f"q{i}", "text": "t", "history": []} for i in range(6)]
    # q0-q1 share d1, q1-q2 share d2 -> {q0, q1, q2} is one group; q3, q4, q5 are alone
    qrels = "q0\td1\t1\nq1\td1\t1\nq1\td2\t1\nq2\td2\t1\nq3\td3\t1\nq4\td4\t1\nq5\td5\t1\n"
    ds = load_dataset_folder(write_folder(tmp_path, corpus, queries, qrels))
    keys = ds.group_keys("document")
    assert keys["q0"] == keys["q1"] == keys["q2"] == "q0" and len(set(keys.values())) == 4
    assert len(set(ds.group_keys("conversation").values())) == 6
    for seed in range(5):
        train, dev, test = ds.split(0.0, 0.34, seed=seed)
        assert len(dev) == 0
        sides = [{keys[q] for q in part.query_ids} for part in (train, test)]
        assert not sides[0] & sides[1]


def test_split_refuses_impossible_requests(tmp_path: Path) -> None:
    ds = load_dataset_folder(write_folder(tmp_path, qrels="q1\td1\t1\nq2\td1\t1\n"))
    with pytest.raises(ValueError, match="empty"):
        ds.split(0.0, 0.3, by="document")
    with pytest.raises(ValueError):
        ds.split(0.5, 0.5)
    with pytest.raises(ValueError, match="by must be"):
        ds.group_keys("entity")  # type: ignore[arg-type]


def test_subset_rejects_unknown_ids(tmp_path: Path) -> None:
    ds = load_dataset_folder(write_folder(tmp_path))
    assert ds.subset(["q2"]).query_ids == ["q2"]
    with pytest.raises(KeyError, match="nope"):
        ds.subset(["nope"])


def test_zero_fraction_sides_stay_empty() -> None:
    corpus = {f"d{i}": {"title": "", "text": "x"} for i in range(10)}
    ds = RetrievalDataset(
        corpus, [Query(f"q{i}", "t") for i in range(10)], {f"q{i}": {f"d{i}": 1} for i in range(10)}
    )
    for seed in range(20):
        assert len(ds.split(0.0, 0.25, seed=seed).dev) == 0
        assert len(ds.split(0.15, 0.0, seed=seed).test) == 0
