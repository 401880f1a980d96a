"""retrieval_head.training.datasets: oversampling, corpus sampling, text files (and what it cannot read)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import write_tiny_dataset

from retrieval_head.retrieval.data import load_dataset_folder
from retrieval_head.training.datasets import Source, corpus_sentences, oversample, read_text_file
from retrieval_head.training.recipe import RecipeError


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
