"""Tests for retrieval_head.core.model: frozen base, trainable head, forward, the hidden-state seam, dtypes, checks."""

from __future__ import annotations

import logging

import pytest
import torch
from core_helpers import ARCHS, TEXTS, make_model, one_thread, small_config, tokenizer
from tiny import tiny_causal_lm
from transformers import AutoConfig, AutoModelForCausalLM

from retrieval_head import BaseMismatchError, RetrievalModel, get_retrieval_model
from retrieval_head.core.base import describe_base

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.mark.parametrize("arch", ARCHS)
def test_attach_records_the_base(arch: str) -> None:
    model = make_model(arch)
    expected = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch]
    assert model.config.base_architecture == expected
    assert model.config.base_hidden_size == 32
    assert model.config.base_num_layers == 3
    assert describe_base(model.base_model)["base_architecture"] == expected
    assert model.layer_index == 3


def test_base_is_frozen_and_head_trainable() -> None:
    model = make_model()
    assert not any(p.requires_grad for p in model.base_model.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert model.training and model.head.training and not model.base_model.training
    model.eval()
    assert not model.head.training


def test_gradients_reach_only_the_head() -> None:
    model = make_model(head_type="transformer")
    model.train()
    batch = model.renderer.collate([model.renderer.render(t) for t in TEXTS[:3]])
    model(**batch).sum().backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is None for p in model.base_model.parameters())


def test_forward_returns_embeddings_for_tokenized_input() -> None:
    model = make_model()
    batch = model.renderer.collate([model.renderer.render(t) for t in TEXTS[:3]])
    with torch.no_grad():
        out = model(**batch)
        whole = model(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (3, 16) and out.dtype == torch.float32
    assert torch.allclose(out, torch.as_tensor(model.encode(TEXTS[:3])), atol=1e-6)
    assert not torch.allclose(out, whole, atol=1e-4)  # default span: every attended token, template included


def test_embed_hidden_states_seam_matches_encode() -> None:
    model = make_model(pooling="last_token")
    batch = model.renderer.collate([model.renderer.render(t) for t in TEXTS])
    with torch.no_grad():
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  output_hidden_states=True).hidden_states
        out = model.embed_hidden_states(hidden[model.layer_index], batch["span_mask"])
    assert torch.allclose(out, torch.as_tensor(model.encode(TEXTS)), atol=1e-6)


def test_embed_hidden_states_rejects_bad_masks() -> None:
    model = make_model()
    states = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="does not match"):
        model.embed_hidden_states(states, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty span"):
        model.embed_hidden_states(states, torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]))


def test_layer_selects_the_hidden_state() -> None:
    first = make_model(layer=1)
    last = make_model(layer=-1)
    assert first.layer_index == 1 and last.layer_index == 3
    assert not torch.allclose(torch.as_tensor(first.encode("hi")), torch.as_tensor(last.encode("hi")), atol=1e-3)


def test_layer_out_of_range_for_the_base_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"RetrievalHeadConfig\.layer=7 .*3 layers"):
        make_model(layer=7)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp32_head_on_a_bf16_base(arch: str) -> None:
    base16 = tiny_causal_lm(arch).to(torch.bfloat16)
    model = get_retrieval_model(base16, small_config(), tokenizer=tokenizer(chat=arch != "gpt2"))
    assert {p.dtype for p in model.base_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.head.parameters()} == {torch.float32}
    assert model.dtype == torch.bfloat16  # the base's precision
    emb = model.encode(TEXTS)
    assert emb.dtype == "float32" and emb.shape == (len(TEXTS), 16)
    assert torch.isfinite(torch.as_tensor(emb)).all()
    reference = make_model(arch).encode(TEXTS)  # the same base weights in fp32
    cosine = torch.nn.functional.cosine_similarity(torch.as_tensor(emb), torch.as_tensor(reference))
    assert (cosine > 0.95).all()
    model.train()
    batch = model.renderer.collate([model.renderer.render(t) for t in TEXTS[:2]])
    model(**batch).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.head.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_is_the_bases(arch: str) -> None:
    model = make_model(arch)
    reference = tiny_causal_lm(arch)  # the same random weights, no head attached
    inputs = tokenizer()("where can I park", return_tensors="pt")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))
    with torch.no_grad():
        assert torch.equal(model.base_model(**inputs).logits, reference(**inputs).logits)


def test_hidden_size_mismatch_names_both_before_any_vector() -> None:
    config = make_model().config  # recorded: LlamaForCausalLM, hidden 32
    wide = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2))
    calls = []
    wide.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(BaseMismatchError, match="base_hidden_size=32.*base_hidden_size=64"):
        RetrievalModel(wide, config, tokenizer=tokenizer())
    assert not calls


def test_architecture_mismatch_names_both() -> None:
    config = make_model("llama").config
    with pytest.raises(BaseMismatchError) as info:
        get_retrieval_model(tiny_causal_lm("qwen2"), config, tokenizer=tokenizer())
    assert "LlamaForCausalLM" in str(info.value) and "Qwen2ForCausalLM" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_no_tokenizer_is_a_clear_error() -> None:
    model = get_retrieval_model(tiny_causal_lm(), small_config())
    with pytest.raises(ValueError, match="tokenizer="):
        model.encode("hi")


def test_tokenizer_without_chat_template_falls_back_to_plain(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="retrieval_head.core.model"):
        model = get_retrieval_model(tiny_causal_lm("gpt2"), small_config(), tokenizer=tokenizer(chat=False))
    assert model.config.query_template == "plain"
    assert "chat template" in caplog.text


def test_sentence_transformers_helpers() -> None:
    model = make_model()
    assert model.get_sentence_embedding_dimension() == 16
    a = model.encode(TEXTS[:2])
    sim = model.similarity(a, a)
    assert sim.shape == (2, 2) and torch.allclose(sim.diagonal(), torch.ones(2), atol=1e-5)
    assert model.num_head_parameters() == sum(p.numel() for p in model.head.parameters())


CONVERSATION = [{"role": "user", "content": "is there a hotel near the restaurant"},
                {"role": "assistant", "content": "yes the guest house is near"},
                {"role": "user", "content": "do they allow pets"}]


def test_a_conversation_wide_static_branch_reads_the_whole_dialogue_and_texts_as_before() -> None:
    wide = make_model(static_dim=4, static_span="conversation")
    narrow = make_model(static_dim=4)
    narrow.head.load_state_dict(wide.head.state_dict())
    torch.nn.init.normal_(wide.head.static_out.weight, generator=torch.Generator().manual_seed(1))
    narrow.head.static_out.weight.data.copy_(wide.head.static_out.weight)
    with torch.inference_mode():
        texts = [wide.encode(TEXTS, convert_to_tensor=True), narrow.encode(TEXTS, convert_to_tensor=True)]
        dialogue = [wide.encode(CONVERSATION, convert_to_tensor=True),
                    narrow.encode(CONVERSATION, convert_to_tensor=True)]
        rendered = wide.renderer.render(CONVERSATION)
        ids = torch.tensor([rendered.input_ids])
        states = wide.layer_states(ids, torch.ones_like(ids))
        span = torch.zeros_like(ids)
        span[0, rendered.span_start : rendered.span_end] = 1
        by_hand = wide.embed_hidden_states(states, span, static_ids=torch.tensor([rendered.static_ids()]))[0]
    assert torch.allclose(texts[0], texts[1], atol=1e-6)  # a text reads its own ids in either mode
    assert not torch.allclose(dialogue[0], dialogue[1], atol=1e-3)
    assert torch.allclose(dialogue[0], by_hand, atol=1e-5)
    assert len(rendered.static_ids()) > rendered.span_end - rendered.span_start
