"""Tests for retrieval_head.core.kv_cache: the KV cache's keyword and output name, whatever transformers calls them."""

from __future__ import annotations

import torch
from tiny import tiny_causal_lm

from retrieval_head.core.kv_cache import cache_kwarg, output_cache


def test_a_cache_from_one_call_continues_the_next() -> None:
    model = tiny_causal_lm().eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        full = model(input_ids=ids).logits[:, -1]
        cache = output_cache(model(input_ids=ids[:, :3], use_cache=True))
        assert cache is not None and cache.get_seq_length() == 3
        rest = model(input_ids=ids[:, 3:], **{cache_kwarg(model): cache}).logits[:, -1]
    assert torch.allclose(full, rest, atol=1e-5)


def test_no_cache_in_an_output_is_none() -> None:
    assert output_cache({"logits": torch.zeros(1)}) is None
    assert output_cache(object()) is None
