"""retrieval_head.training.datasets: oversampling, corpus sampling, sub-dialogues, text files (and what it cannot
read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from training_helpers import tiny_models, tiny_recipe, write_tiny_dataset

from retrieval_head.retrieval.data import Query, load_dataset_folder
from retrieval_head.training import Trainer, features
from retrieval_head.training.datasets import (
    Source,
    corpus_sentences,
    lm_input,
    oversample,
    plan_sources,
    prefill_features,
    read_text_file,
    sub_dialogues,
)
from retrieval_head.training.recipe import RecipeError
from retrieval_head.training.setup import recipe_cache


def source(name: str, train: list[int]) -> Source:
    n = max(train, default=0) + 1
    return Source(name=name, kind="queries", items=list(range(n)), features={}, teacher=torch.zeros(n, 2),
                  top_k=torch.zeros(n, 1, dtype=torch.long), gold=[[] for _ in range(n)],
                  splits={"train": train, "dev": [0]})


def test_oversample_repeats_only_the_named_sources_train_rows() -> None:
    sources = [source("dstc", [0, 1, 2]), source("dstc:corpus", [0, 1]), source("scifact", [0])]
    oversample(sources, {"dstc": 3, "scifact": 1})
    assert sources[0].splits["train"] == [0, 1, 2] * 3
    assert sources[0].splits["dev"] == [0]  # dev and test are never repeated
    assert sources[1].splits["train"] == [0, 1] and sources[2].splits["train"] == [0]


def test_groups_give_a_dataset_and_its_corpus_one_id_per_train_row() -> None:
    from retrieval_head.training.datasets import TrainingData

    sources = [source("dstc", [0, 1, 2]), source("dstc:corpus", [0, 1]), source("scifact", [0]),
               source("empty", []), source("notes.txt", [0, 1])]
    data = TrainingData(sources=sources, documents=torch.zeros(0, 2), doc_ids=[], fingerprint=None, hidden_size=2)
    assert data.groups("train") == [0, 0, 0, 0, 0, 1, 2, 2]  # rows in the order examples() concatenates them


def test_oversample_names_an_unknown_source_and_the_known_ones() -> None:
    with pytest.raises(RecipeError, match=r"\['dstc11'\].*'dstc', 'scifact'"):
        oversample([source("dstc", [0]), source("scifact", [0])], {"dstc11": 2})


def test_a_smaller_corpus_sample_is_a_prefix_of_a_larger_one(tmp_path: Path) -> None:
    dataset = load_dataset_folder(write_tiny_dataset(tmp_path / "tiny"))
    every = corpus_sentences(dataset, None, seed=3)
    assert corpus_sentences(dataset, 5, seed=3) == every[:5] and len(set(every)) == len(every)
    assert corpus_sentences(dataset, 5, seed=4) != every[:5]


def test_text_files_name_the_file_and_line_of_what_cannot_be_read(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("first text\n\n  second text  \n", encoding="utf-8")
    assert read_text_file(good) == ["first text", "second text"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt: no training text"):
        read_text_file(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt, line 2: not UTF-8"):
        read_text_file(latin)
    long = tmp_path / "long.txt"
    long.write_text("short\n" + "x" * 50 + "\n")
    with pytest.raises(ValueError, match="long.txt, line 2: 50 characters"):
        read_text_file(long, max_chars=40)


def test_sub_dialogues_make_every_earlier_user_turn_a_query_of_its_own() -> None:
    dialogue = Query("q", "and the price?", ("find a hotel", "the Acorn", "is it quiet?", "yes"), ("U", "S", "U", "S"))
    subs = sub_dialogues([dialogue, dialogue])  # a repeated dialogue adds nothing twice
    assert [(s.text, s.history, s.history_speakers) for s in subs] == [
        ("find a hotel", (), ()), ("is it quiet?", ("find a hotel", "the Acorn"), ("U", "S"))]
    held_out = Query("dev", "is it quiet?", ("find a hotel", "the Acorn"))
    assert [s.text for s in sub_dialogues([dialogue], exclude=[held_out])] == ["find a hotel"]
    assert sub_dialogues([Query("single", "a question")]) == []


def test_sub_dialogues_come_only_from_train_dialogues(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path).replace(**{"data.sub_dialogues": True, "data.corpus_texts": 0})
    base, tokenizer, teacher = tiny_models()
    data = Trainer(recipe, tmp_path / "run", base=base, tokenizer=tokenizer, teacher=teacher,
                   show_progress_bar=False).build_data()
    queries, subs = data.sources
    assert subs.name == "tiny:dialogues" and subs.kind == "dialogues" and set(subs.splits) == {"train"}
    train_ids = {queries.query_ids[r] for r in queries.splits["train"]}
    split = queries.dataset.split(0.2, 0.2, seed=0)
    expected = sub_dialogues([q for q in split.train if q.id in train_ids], [*split.dev, *split.test])
    assert len(expected) > 0 and subs.items == [lm_input(q) for q in expected]
    assert subs.teacher.shape == (len(expected), 16) and len(subs.features["mean.L3"]) == len(expected)
    assert all(row.split("#")[0] in train_ids for row in (q.id for q in expected))


def test_two_ranks_prefill_each_shard_once_and_the_data_then_needs_no_lm_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("".join(f"plain text number {i} for the head\n" for i in range(6)), encoding="utf-8")
    recipe = tiny_recipe(tmp_path).replace(**{"data.sub_dialogues": True, "data.text_files": [str(text_file)]})
    base, tokenizer, teacher = tiny_models()
    trainer = Trainer(recipe, tmp_path / "run", base=base, tokenizer=tokenizer, teacher=teacher,
                      show_progress_bar=False)
    plans = plan_sources(recipe)
    assert [p.kind for p in plans] == ["queries", "dialogues", "corpus", "texts"]
    extracted: dict[int, list[Any]] = {0: [], 1: []}
    real = features.extract_features
    for rank in (0, 1):
        def counting(model: Any, items: Any, *args: Any, rank: int = rank, **kwargs: Any) -> Any:
            extracted[rank].extend(items)
            return real(model, items, *args, **kwargs)

        monkeypatch.setattr(features, "extract_features", counting)
        prefill_features(recipe, trainer.model, recipe_cache(recipe), rank, 2, show_progress_bar=False)
    # one shard per source here: the shards are numbered across sources, so rank 1 gets the 2nd and 4th
    assert extracted[0] == plans[0].items + plans[2].items and extracted[1] == plans[1].items + plans[3].items

    def no_lm_pass(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the LM ran after every rank had prefilled its shards")

    monkeypatch.setattr(features, "extract_features", no_lm_pass)
    data = trainer.build_data()
    assert [(s.name, s.kind, s.items, s.splits) for s in data.sources] == [
        (p.name, p.kind, p.items, p.splits) for p in plans]
