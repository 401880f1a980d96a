"""retrieval_head.training.datasets: oversampling repeats a source's train rows, and names what it cannot find."""

from __future__ import annotations

import pytest
import torch

from retrieval_head.training.datasets import Source, oversample
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
