"""Capture during generation: the hooked module carries the head's layer, no extra LM pass, captured == rerun."""

from __future__ import annotations

import pytest
import torch
from agent_helpers import CONV, NO_SPECIALS, SHORT, make_index, make_model, rerun_embedding

from retrieval_head.agent import NativeRetriever, find_capture_point


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1, -1])
def test_capture_point_carries_the_heads_layer(arch, layer):
    model = make_model(arch, layer=layer)
    point = find_capture_point(model)
    assert point.module is not None
    if layer == -1:
        assert point.where == "out"  # the final norm, not the last block's raw output


def test_no_extra_forward_pass():
    model = make_model()
    agent = NativeRetriever(model, make_index())
    calls = {"lm": 0, "decoder": 0}
    base = model.base_model
    hooks = [base.register_forward_pre_hook(lambda *a: calls.__setitem__("lm", calls["lm"] + 1)),
             base.model.register_forward_pre_hook(lambda *a: calls.__setitem__("decoder", calls["decoder"] + 1))]
    try:
        prompt = torch.tensor([agent.prompt_ids(CONV)])
        base.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                      min_new_tokens=6, do_sample=False, pad_token_id=0, **NO_SPECIALS)
        plain = dict(calls)
        calls.update(lm=0, decoder=0)
        result = agent.generate_and_search(CONV, k=3, max_new_tokens=6, min_new_tokens=6, **NO_SPECIALS)
    finally:
        for h in hooks:
            h.remove()
    assert len(result.generated_ids) == 6
    assert plain == {"lm": 6, "decoder": 6}  # prefill + 5 decode steps
    assert calls == plain  # capture, span finding, head and search add no pass of the LM
    assert len(result.hits) == 3 and all(h.doc_id.startswith("d") for h in result.hits)


@pytest.mark.parametrize(("arch", "head_type"), [("llama", "mlp"), ("llama", "transformer"), ("gpt2", "mlp"),
                                                 ("qwen2", "linear")])
@pytest.mark.parametrize("layer", [1, -1])
def test_captured_embedding_equals_one_forward_rerun(arch, head_type, layer):
    model = make_model(arch, layer=layer, head_type=head_type)
    model.base_model.generation_config.update(eos_token_id=2, bos_token_id=2)  # tiny gpt2 keeps 50256 otherwise
    # a short instruction: tiny gpt2 has 256 learned positions and the tiny tokenizer splits unknown words finely
    agent = NativeRetriever(model, make_index(), instruction="Search query between {open} and {close}.")
    result = agent.generate_and_search(CONV, max_new_tokens=8, **NO_SPECIALS)
    assert result.span.source == "open_marker" and not result.used_markers  # random LM: never closes
    assert result.note and "</query>" in result.note
    expected = rerun_embedding(agent, result)
    assert (result.query_embedding - expected).abs().max().item() < 1e-4


def test_batch_generation_left_padding_matches_rerun():
    model = make_model()
    agent = NativeRetriever(model, make_index())
    batch = [SHORT, CONV]
    results = agent.generate_and_search(batch, k=2, max_new_tokens=7, min_new_tokens=7, **NO_SPECIALS)
    assert len(results) == 2
    singles = [agent.generate_and_search(c, max_new_tokens=7, min_new_tokens=7, **NO_SPECIALS) for c in batch]
    for res, single in zip(results, singles, strict=True):
        # same tokens in the same context whether the conversation was batched (left-padded) or alone
        assert res.generated_ids == single.generated_ids
        assert (res.query_embedding - single.query_embedding).abs().max().item() < 1e-4
        assert (res.query_embedding - rerun_embedding(agent, res)).abs().max().item() < 1e-4
    # and a left-padded one-forward re-run with generate's position ids gives the same vectors
    width = max(len(r.prompt_ids) for r in results)
    n = min(len(r.generated_ids) for r in results)
    ids = torch.zeros(2, width + n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(results):
        ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids + r.generated_ids[:n])
        mask[row, width - len(r.prompt_ids):] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.inference_mode():
        states = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  output_hidden_states=True).hidden_states[model.layer_index]
    span = torch.zeros_like(mask)
    for row, r in enumerate(results):
        span[row, width + r.span.start : width + r.span.end] = 1
    with torch.inference_mode():
        rerun = model.embed_hidden_states(states, span)
    got = torch.stack([r.query_embedding for r in results])
    assert (got - rerun).abs().max().item() < 1e-4
