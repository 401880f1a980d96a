"""Tests for retrieval_head.core.layer_states: the truncated pass gives a full pass's states, and stops early."""

from __future__ import annotations

import pytest
import torch
from tiny import ARCHITECTURES, tiny_causal_lm

from retrieval_head.core.layer_states import decoder_layers, hidden_states_at


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_states_equal_a_full_pass_for_every_index(arch: str) -> None:
    model = tiny_causal_lm(arch)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    with torch.inference_mode():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        for index in range(len(full)):
            got = hidden_states_at(model, [index], ids, mask)[index]
            assert torch.equal(got, full[index]), (arch, index)
        several = hidden_states_at(model, [0, 2, 1], ids, mask)
    assert sorted(several) == [0, 1, 2] and all(torch.equal(several[i], full[i]) for i in several)


def test_blocks_after_the_deepest_wanted_and_the_lm_head_never_run() -> None:
    model = tiny_causal_lm("llama")
    _, blocks = decoder_layers(model)
    ran: list[str] = []
    blocks[2].register_forward_hook(lambda *a: ran.append("block 2"))
    model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))
    ids = torch.tensor([[5, 6, 7]])
    hidden_states_at(model, [2], ids, torch.ones_like(ids))
    assert ran == []
    hidden_states_at(model, [3], ids, torch.ones_like(ids))  # the last index: whole decoder, still no logits
    assert ran == ["block 2"]


def test_out_of_range_layer_is_a_clear_error() -> None:
    model = tiny_causal_lm("llama")
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match=r"0\.\.3"):
        hidden_states_at(model, [4], ids, torch.ones_like(ids))
