"""NativeRetriever: search, the user turn from the same generation, teacher checks, caches, answers, chat CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from agent_helpers import (
    CONV,
    DIM,
    FINGERPRINT,
    NO_SPECIALS,
    SHORT,
    make_index,
    make_model,
    rerun_embedding,
)
from tiny import save_tiny, tiny_causal_lm, tiny_tokenizer

from retrieval_head import RetrievalHeadConfig, get_retrieval_model
from retrieval_head.agent import NativeRetriever
from retrieval_head.retrieval.fingerprint import TeacherFingerprint, TeacherMismatchError
from retrieval_head.retrieval.index import DocumentIndex


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_user_turn_from_the_same_generation_equals_encode(arch):
    model = make_model(arch)
    model.base_model.generation_config.update(eos_token_id=2, bos_token_id=2)
    agent = NativeRetriever(model, make_index(), instruction="Search query between {open} and {close}.")
    prompt = agent.query_prompt(CONV)
    rendered = model.renderer.render(CONV)
    assert prompt.input_ids[: len(rendered.input_ids)] == rendered.input_ids
    assert prompt.user_span == (rendered.span_start, rendered.span_end)
    result = agent.generate_and_search(CONV, max_new_tokens=5, **NO_SPECIALS)
    expected = torch.as_tensor(model.encode(CONV))
    assert (result.user_turn_embedding - expected).abs().max().item() < 1e-4
    assert result.searched_with == "user_turn" and result.search_embedding is result.user_turn_embedding


def test_user_turn_in_batch_generation_and_with_a_reused_cache():
    model = make_model()
    agent = NativeRetriever(model, make_index())
    results = agent.generate_and_search([SHORT, CONV], max_new_tokens=4, **NO_SPECIALS)
    for conversation, result in zip([SHORT, CONV], results, strict=True):  # left padding shifts SHORT's span
        expected = torch.as_tensor(model.encode(conversation))
        assert (result.user_turn_embedding - expected).abs().max().item() < 1e-4
    first = agent.generate_and_search(CONV[:1], max_new_tokens=4, **NO_SPECIALS)
    conversation = [*CONV[:1], {"role": "assistant", "content": "yes"}, CONV[2]]
    again = agent.generate_and_search(conversation, max_new_tokens=4, cache=first.cache, **NO_SPECIALS)
    assert again.timings["cached_prompt_tokens"] > 0
    expected = torch.as_tensor(model.encode(conversation))
    assert (again.user_turn_embedding - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("search_with", ["user_turn", "query"])
def test_hits_come_from_the_chosen_embedding(search_with):
    model = make_model()
    index = make_index()
    agent = NativeRetriever(model, index, search_with=search_with)
    result = agent.generate_and_search(CONV, k=3, max_new_tokens=4, **NO_SPECIALS)
    chosen = result.user_turn_embedding if search_with == "user_turn" else result.query_embedding
    assert result.searched_with == search_with and result.search_embedding is chosen
    _, ids = index.search(chosen.numpy()[None], 3)
    assert result.doc_ids == ids[0]
    with pytest.raises(ValueError, match="search_with"):
        NativeRetriever(model, index, search_with="answer")


def test_a_plain_template_head_has_no_user_turn_and_searches_with_the_query():
    config = RetrievalHeadConfig(layer=2, output_dim=DIM, inner_dim=32, query_template="plain",
                                 teacher=FINGERPRINT.to_dict())
    model = get_retrieval_model(tiny_causal_lm(), config, tokenizer=tiny_tokenizer())
    agent = NativeRetriever(model, make_index())
    assert agent.query_prompt(CONV).user_span is None
    result = agent.generate_and_search(CONV, k=2, max_new_tokens=4, **NO_SPECIALS)
    assert result.user_turn_embedding is None and result.searched_with == "query"
    assert (result.query_embedding - rerun_embedding(agent, result)).abs().max().item() < 1e-4


def test_index_from_another_teacher_is_refused():
    other = TeacherFingerprint("other-teacher", None, DIM, "cosine", True, "b" * 64)
    with pytest.raises(TeacherMismatchError, match="other-teacher"):
        NativeRetriever(make_model(), make_index(other))
    with pytest.raises(TeacherMismatchError, match="records no teacher"):
        NativeRetriever(make_model(teacher=None), make_index())
    with pytest.raises(TeacherMismatchError, match="dim"):
        NativeRetriever(make_model(), DocumentIndex.from_embeddings(np.eye(4, dtype=np.float32), list("abcd")))
    NativeRetriever(make_model(teacher=None), make_index(), check_teacher=False)  # explicit opt-out


def test_embed_conversation_equals_encode():
    model = make_model()
    agent = NativeRetriever(model, make_index())
    for conversation in (SHORT, CONV):
        got = agent.embed_conversation(conversation).embedding
        expected = torch.as_tensor(model.encode(conversation))
        assert (got - expected).abs().max().item() < 1e-5


def test_embed_conversation_reuses_its_prefill_cache():
    model = make_model()
    agent = NativeRetriever(model, make_index())
    first = agent.embed_conversation(CONV[:1], return_cache=True)
    assert first.cache is not None and first.cache.cache.get_seq_length() == len(first.input_ids)
    again = agent.embed_conversation(CONV, cache=first.cache)
    fresh = agent.embed_conversation(CONV)
    assert (again.embedding - fresh.embedding).abs().max().item() < 1e-4


def test_cache_reuse_across_turns():
    model = make_model()
    agent = NativeRetriever(model, make_index())
    turn1 = agent.generate_and_search(CONV[:1], max_new_tokens=6, **NO_SPECIALS)
    assert turn1.cache is not None
    conversation = [*CONV[:1], {"role": "assistant", "content": "yes"}, CONV[2]]
    reused = agent.generate_and_search(conversation, max_new_tokens=6, cache=turn1.cache, **NO_SPECIALS)
    fresh = agent.generate_and_search(conversation, max_new_tokens=6, **NO_SPECIALS)
    assert reused.timings["cached_prompt_tokens"] > 0 and fresh.timings["cached_prompt_tokens"] == 0
    assert reused.generated_ids == fresh.generated_ids
    assert (reused.query_embedding - fresh.query_embedding).abs().max().item() < 1e-4


def test_answer_reuses_query_turn_cache():
    model = make_model()
    agent = NativeRetriever(model, make_index())
    result = agent.generate_and_search(SHORT, k=2, max_new_tokens=6, **NO_SPECIALS)
    calls = []
    hook = model.base_model.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        reply, cache = agent.answer(SHORT, result, ["passage one", "passage two"], max_new_tokens=4, **NO_SPECIALS)
    finally:
        hook.remove()
    full = len(cache.ids) - 3  # prompt of the answer turn (cache covers prompt + 3 of 4 generated tokens)
    assert isinstance(reply, str) and calls[0] < full  # the prefill only ran the tokens after the query turn


def test_chat_command_non_interactive(tmp_path, capsys):
    from retrieval_head.cli import main

    base_dir = save_tiny(tmp_path / "base")
    model = get_retrieval_model(tiny_causal_lm(), RetrievalHeadConfig(
        layer=2, output_dim=DIM, inner_dim=32, teacher=FINGERPRINT.to_dict(), base_model_name_or_path=str(base_dir)),
        tokenizer=tiny_tokenizer())
    model.save_pretrained(tmp_path / "head")
    make_index().save(tmp_path / "index")
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text("".join(
        f'{{"id": "d{i}", "title": "Doc {i}", "text": "text of document {i}"}}\n' for i in range(12)))
    code = main(["chat", "--head", str(tmp_path / "head"), "--index", str(tmp_path / "index"), "--data", str(data),
                 "--message", "where can I park", "--max-query-tokens", "6", "--max-answer-tokens", "4", "-k", "2",
                 "--json", "--mode", "query", "--search-with", "query"])
    assert code == 0
    import json

    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["hits"] and out["hits"][0]["doc_id"].startswith("d") and "answer" in out
    assert out["hits"][0]["title"].startswith("Doc ")
    assert out["searched_with"] == "query"


@pytest.mark.real_model
def test_embedded_smollm2_writes_a_query_and_capture_matches(embedded_agent):
    from retrieval_head.io.embedded import BASE_ID

    base, tokenizer = embedded_agent
    config = RetrievalHeadConfig(layer=-8, output_dim=384, head_type="linear", base_model_name_or_path=BASE_ID)
    model = get_retrieval_model(base, config, tokenizer=tokenizer)
    agent = NativeRetriever(model, None)
    conversation = [
        {"role": "user", "content": "I'm staying at the Avalon hotel next week."},
        {"role": "assistant", "content": "Great, how can I help?"},
        {"role": "user", "content": "Do they have free parking?"},
    ]
    result = agent.generate_and_search(conversation, max_new_tokens=16)
    assert result.query_text.strip()
    assert result.used_markers or result.note  # either it closed the query, or we say what we fell back to
    assert (result.query_embedding - rerun_embedding(agent, result)).abs().max().item() < 1e-4
    assert (agent.embed_conversation(conversation).embedding
            - torch.as_tensor(model.encode(conversation))).abs().max().item() < 1e-4


def test_a_static_branch_head_reads_the_ids_generate_already_has():
    model = make_model(static_dim=8)
    agent = NativeRetriever(model, make_index(), instruction="Search query between {open} and {close}.")
    plain = make_model()
    result = agent.generate_and_search(CONV, max_new_tokens=5, **NO_SPECIALS)
    expected = torch.as_tensor(model.encode(CONV))
    assert (result.user_turn_embedding - expected).abs().max().item() < 1e-4
    assert (expected - torch.as_tensor(plain.encode(CONV))).abs().max().item() > 1e-3  # the branch counts
    assert (result.query_embedding - rerun_embedding(agent, result)).abs().max().item() < 1e-4
    got = agent.embed_conversation(CONV).embedding
    assert (got - expected).abs().max().item() < 1e-5
    batch = agent.generate_and_search([SHORT, CONV], max_new_tokens=4, **NO_SPECIALS)
    assert (batch[0].user_turn_embedding - torch.as_tensor(model.encode(SHORT))).abs().max().item() < 1e-4


def test_a_conversation_wide_static_branch_reads_the_whole_dialogue_in_every_agent_path():
    model = make_model(static_dim=8, static_span="conversation")
    narrow = make_model(static_dim=8)
    agent = NativeRetriever(model, make_index(), instruction="Search query between {open} and {close}.")
    expected = torch.as_tensor(model.encode(CONV))
    assert (expected - torch.as_tensor(narrow.encode(CONV))).abs().max().item() > 1e-3  # the history's ids count
    result = agent.generate_and_search(CONV, max_new_tokens=5, **NO_SPECIALS)
    assert (result.user_turn_embedding - expected).abs().max().item() < 1e-4
    assert (agent.embed_conversation(CONV).embedding - expected).abs().max().item() < 1e-5
    batch = agent.generate_and_search([SHORT, CONV], max_new_tokens=4, **NO_SPECIALS)
    assert (batch[0].user_turn_embedding - torch.as_tensor(model.encode(SHORT))).abs().max().item() < 1e-4
    assert (batch[1].user_turn_embedding - expected).abs().max().item() < 1e-4
