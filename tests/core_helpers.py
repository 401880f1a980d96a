"""Small builders shared by the core's tests: tiny bases with a head attached, in a few milliseconds."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import pytest
import torch
from tiny import tiny_causal_lm, tiny_tokenizer

from retrieval_head import RetrievalHeadConfig, RetrievalModel, get_retrieval_model

ARCHS = ("llama", "qwen2", "gpt2")
TEXTS = [
    "where can I park my car near the hotel",
    "is breakfast included",
    "hi",
    "the restaurant serves vegetarian food and has outdoor seating, do they allow pets in the guest house",
    "what is the capital of France",
]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run tiny-model tests on one thread: a 32-wide matmul gains nothing from two, and on a busy machine
    OpenMP threads waiting for each other make it ~100x slower. Use with `pytestmark`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@lru_cache(maxsize=2)
def tokenizer(chat: bool = True) -> Any:
    """The tiny ChatML tokenizer (shared: nothing here mutates it)."""
    return tiny_tokenizer(chat=chat)


def small_config(**overrides: Any) -> RetrievalHeadConfig:
    """A head config sized for the tiny bases (hidden size 32)."""
    settings: dict[str, Any] = dict(output_dim=16, inner_dim=32, num_attention_heads=4, dropout=0.0)
    settings.update(overrides)
    return RetrievalHeadConfig(**settings)


def make_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> RetrievalModel:
    """A tiny random base of `arch` with a fresh head (gpt2's tokenizer has no chat template)."""
    base = tiny_causal_lm(arch, seed=seed)
    return get_retrieval_model(base, small_config(**overrides), tokenizer=tokenizer(chat=arch != "gpt2"))
