"""The search-first turn: one prefill, the head, the index, the answer continuing the same KV cache."""

from __future__ import annotations

import pytest
import torch
from agent_helpers import CONV, FINGERPRINT, NO_SPECIALS, SHORT, make_index, make_model

from retrieval_head.agent import NativeRetriever
from retrieval_head.agent.turn import SearchFirstAgent, count_forwards
from retrieval_head.retrieval.fingerprint import TeacherFingerprint, TeacherMismatchError

DOCS = {f"d{i}": f"passage number {i} about rooms and parking" for i in range(12)}


def make_agent(arch: str = "llama", k: int = 2, passage_chars: int = 40) -> SearchFirstAgent:
    """The tiny LMs read 256 positions: short passages leave room for the dialogue."""
    return SearchFirstAgent(NativeRetriever(make_model(arch), make_index()), DOCS, k=k, passage_chars=passage_chars)


def plain_answer(agent: SearchFirstAgent, result, max_new_tokens: int) -> list[int]:
    """Greedy answer to the same prompt from scratch (no cache): what the cached turn must reproduce."""
    text = agent.tokenizer.apply_chat_template(agent.model.renderer.messages(result.history[:-1]), tokenize=False,
                                               add_generation_prompt=True)
    ids = torch.tensor([agent.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = agent.model.base_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                              max_new_tokens=max_new_tokens, **NO_SPECIALS)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_prefill_embeds_like_encode_and_no_dialogue_token_runs_twice(arch):
    agent = make_agent(arch)
    result = agent.turn(CONV, max_new_tokens=5, **NO_SPECIALS)
    expected = torch.as_tensor(agent.model.encode(CONV))
    assert torch.allclose(result.embedding, expected, atol=1e-5)
    assert result.doc_ids == [h.doc_id for h in agent.retriever.search(expected, 2)[0]] and len(result.passages) == 2
    t = result.tokens
    assert t["forward_passes"] == 1 + t["answer"]  # the prefill, then generate: the tail + each new token
    assert t["computed"] == t["dialogue"] + t["passages"] + t["answer"] - 1  # the last token is never fed
    rendered = agent.model.renderer.render(CONV)
    assert t["reused"] == len(agent.prefix.ids) > 0  # the template's prefix, computed when the agent was built
    assert t["dialogue"] + t["reused"] == len(rendered.input_ids)  # the dialogue, once; no query was written
    assert result.cache.cache.get_seq_length() == len(result.cache.ids)
    assert set(result.timings) >= {"prefill_s", "embed_s", "search_s", "first_token_s", "answer_s", "total_s"}
    assert result.timings["first_token_s"] <= result.timings["total_s"]


def test_the_answer_equals_answering_the_same_prompt_from_scratch():
    agent = make_agent()
    result = agent.turn(CONV, max_new_tokens=6, **NO_SPECIALS)
    scratch = agent.tokenizer.decode(plain_answer(agent, result, 6), skip_special_tokens=True).strip()
    assert scratch == result.answer and result.tokens["answer"] == 6


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_first_turn_from_the_template_prefix_equals_one_computed_whole(arch):
    agent = make_agent(arch)
    whole = SearchFirstAgent(agent.retriever, DOCS, k=2, passage_chars=40, reuse_prefix=False)
    assert whole.prefix is None and agent.prefix.text == agent.model.renderer.render_text(CONV)[0][: len(
        agent.prefix.text)]
    ours, theirs = (a.turn(CONV, max_new_tokens=5, **NO_SPECIALS) for a in (agent, whole))
    assert theirs.tokens["reused"] == 0 and ours.tokens["reused"] == len(agent.prefix.ids) > 0
    assert ours.tokens["computed"] == theirs.tokens["computed"] - len(agent.prefix.ids)
    assert torch.allclose(ours.embedding, theirs.embedding, atol=1e-5)
    assert ours.doc_ids == theirs.doc_ids and ours.answer == theirs.answer
    kept = [layer.keys.clone() for layer in agent.prefix.cache.layers]
    again = agent.turn(CONV, max_new_tokens=5, **NO_SPECIALS)  # the prefix is copied, never extended in place
    assert again.answer == ours.answer and agent.prefix.cache.get_seq_length() == len(agent.prefix.ids)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(kept, agent.prefix.cache.layers, strict=True))
    own = [{"role": "system", "content": "answer in one word"}, *CONV]  # a system prompt of its own
    ours, theirs = (a.turn(own, max_new_tokens=5, **NO_SPECIALS) for a in (agent, whole))
    assert 0 < ours.tokens["reused"] < len(agent.prefix.ids)  # only the ids both share are reused
    assert torch.allclose(ours.embedding, theirs.embedding, atol=1e-5) and ours.answer == theirs.answer


def test_the_template_prefix_follows_the_model_to_another_dtype():
    agent = make_agent()
    agent.model.base_model.to(torch.bfloat16)
    result = agent.turn(CONV, max_new_tokens=3, **NO_SPECIALS)
    assert agent.prefix.cache.layers[0].keys.dtype == torch.bfloat16 and result.tokens["reused"] > 0


def words_only(tokenizer, text: str = "yes it is the room"):
    """`prefix_allowed_tokens_fn` keeping a random LM to whole words (its answers then render back exactly)."""
    allowed = tokenizer(text, add_special_tokens=False)["input_ids"]
    return lambda batch_id, input_ids: allowed


def test_the_next_turn_reuses_every_token_already_computed():
    agent = make_agent(k=1, passage_chars=12)
    words = {"prefix_allowed_tokens_fn": words_only(agent.tokenizer)}
    first = agent.turn(SHORT, max_new_tokens=4, **words)
    conversation = [*first.history, {"role": "user", "content": "and is breakfast included"}]
    with count_forwards(agent.model.base_model) as calls:
        second = agent.turn(conversation, max_new_tokens=4, cache=first.cache, **words)
    assert second.tokens["reused"] == len(first.cache.ids) > 0
    rest = agent.model.renderer.render_text(conversation)[0][len(first.cache.text):]
    assert rest.endswith("and is breakfast included")  # only the new user message (and its chat markers) is new
    assert second.tokens["dialogue"] == len(agent.tokenizer(rest, add_special_tokens=False)["input_ids"])
    assert calls.count == second.tokens["forward_passes"]
    fresh = agent.turn(conversation, max_new_tokens=4, **words)
    assert fresh.tokens["reused"] == len(agent.prefix.ids)  # only the template's prefix
    assert torch.allclose(second.embedding, fresh.embedding, atol=1e-4)
    assert second.doc_ids == fresh.doc_ids and second.answer == fresh.answer


def test_a_prefilled_history_leaves_only_the_new_user_message_to_compute():
    agent = make_agent()
    history, question = CONV[:-1], CONV[-1]["content"]
    cache = agent.retriever.prefill(history)
    assert cache.cache.get_seq_length() == len(cache.ids) and CONV[-1]["content"] not in cache.text
    with count_forwards(agent.model.base_model) as calls:
        warm = agent.turn(CONV, max_new_tokens=5, cache=cache, **NO_SPECIALS)
    cold = agent.turn(CONV, max_new_tokens=5, **NO_SPECIALS)
    assert warm.tokens["reused"] == len(cache.ids) > 0
    prefix = cold.tokens["reused"]  # a first turn starts from the template's prefix
    assert warm.tokens["dialogue"] == cold.tokens["dialogue"] + prefix - len(cache.ids)  # the history never reruns
    assert calls.tokens == cold.tokens["computed"] + prefix - len(cache.ids)
    assert torch.allclose(warm.embedding, cold.embedding, atol=1e-4)
    assert warm.doc_ids == cold.doc_ids and warm.answer == cold.answer
    assert question in agent.model.renderer.render_text(CONV)[0][len(cache.text):]
    query_turn = agent.retriever.generate_and_search(CONV, max_new_tokens=4, cache=agent.retriever.prefill(history))
    assert query_turn.timings["cached_prompt_tokens"] == len(cache.ids)  # the query-writing path reuses it too
    with pytest.raises(ValueError, match="non-empty conversation"):
        agent.retriever.prefill([])


def test_the_query_path_continues_a_prefilled_history_past_the_heads_window():
    retriever = NativeRetriever(make_model(), make_index())
    long = [{"role": "user", "content": "tell me about the rooms " * 12},
            {"role": "assistant", "content": "sure " * 30},
            {"role": "user", "content": "do they allow pets"}]
    retriever.model.renderer.max_length = 24  # the head's window is shorter than the dialogue
    cut = retriever.query_prompt(long)
    cache = retriever.prefill(long[:-1])
    full = retriever.query_prompt(long, cache)
    assert len(cut.input_ids) < len(full.input_ids) and full.input_ids[: len(cache.ids)] == cache.ids
    start, end = full.user_span
    said = retriever.tokenizer.decode(full.input_ids[start:end])
    assert said.strip() == "do they allow pets"
    result = retriever.generate_and_search(long, max_new_tokens=3, cache=cache)
    assert result.timings["cached_prompt_tokens"] == len(cache.ids)  # none of the history runs again


def test_a_batch_is_one_prefill_and_answers_as_each_alone():
    agent = make_agent()
    batch = agent.turns([CONV, SHORT], max_new_tokens=4, **NO_SPECIALS)
    alone = [agent.turn(c, max_new_tokens=4, **NO_SPECIALS) for c in (CONV, SHORT)]
    for b, a in zip(batch, alone, strict=True):
        assert torch.allclose(b.embedding, a.embedding, atol=1e-4)
        assert b.doc_ids == a.doc_ids and b.answer == a.answer
    answers = sum(r.tokens["answer"] for r in batch)
    assert batch[0].tokens["forward_passes"] == 1 + answers  # one prefill for both conversations


def test_a_peft_adapted_agent_searches_with_its_adapted_states():
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_causal_lm, tiny_tokenizer

    from retrieval_head import RetrievalHeadConfig, get_retrieval_model

    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    base = get_peft_model(tiny_causal_lm(), lora)
    config = RetrievalHeadConfig(layer=2, output_dim=16, inner_dim=32, teacher=FINGERPRINT.to_dict())
    model = get_retrieval_model(base, config, tokenizer=tiny_tokenizer())
    agent = SearchFirstAgent(NativeRetriever(model, make_index()), DOCS, k=2, passage_chars=40)
    result = agent.turn(CONV, max_new_tokens=3, **NO_SPECIALS)
    assert torch.allclose(result.embedding, torch.as_tensor(model.encode(CONV)), atol=1e-5)


def test_a_conversation_longer_than_the_context_is_cut_from_the_left_and_says_so():
    agent = make_agent()
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "tell me about the rooms " * 6}
            for i in range(8)] + [{"role": "user", "content": "do they allow pets"}]
    result = agent.turn(long, max_new_tokens=3, **NO_SPECIALS)
    assert result.cut_tokens > 0 and result.cache.text is None  # a cut prompt is never reused as a prefix
    assert result.tokens["dialogue"] + result.tokens["passages"] + 3 <= agent.context


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty conversation"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "must be the user's"),
    ([{"role": "user", "content": ""}], "no tokens"),
])
def test_bad_conversations_are_clear_errors(messages, match):
    with pytest.raises(ValueError, match=match):
        make_agent().turn(messages, max_new_tokens=2)


def test_k_is_checked_and_capped_at_the_index():
    agent = make_agent(passage_chars=4)
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be a positive"):
            agent.turn(SHORT, k=k, max_new_tokens=2)
    assert len(agent.turn(SHORT, k=50, max_new_tokens=2, **NO_SPECIALS).hits) == len(DOCS)


def test_an_index_from_another_teacher_or_none_is_refused():
    other = TeacherFingerprint("other-teacher", None, 16, "cosine", True, "b" * 64)
    with pytest.raises(TeacherMismatchError):
        SearchFirstAgent(NativeRetriever(make_model(), make_index(other)), DOCS)
    with pytest.raises(ValueError, match="with an index"):
        SearchFirstAgent(NativeRetriever(make_model()), DOCS)


@pytest.mark.real_model
def test_embedded_smollm2_search_first_turn_answers_from_its_one_prefill(embedded_agent):
    from retrieval_head import RetrievalHeadConfig, get_retrieval_model
    from retrieval_head.io.embedded import BASE_ID
    from retrieval_head.retrieval.index import DocumentIndex

    base, tokenizer = embedded_agent
    config = RetrievalHeadConfig(layer=24, output_dim=16, head_type="linear", base_model_name_or_path=BASE_ID,
                                 teacher=FINGERPRINT.to_dict())
    model = get_retrieval_model(base, config, tokenizer=tokenizer)
    vectors = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).numpy()
    documents = {"p": "Parking at the Avalon is free for guests.", "w": "The Avalon has free wifi.",
                 "b": "Breakfast is served from 7 to 10.", "g": "There is a gym on the first floor."}
    index = DocumentIndex.from_embeddings(vectors, list(documents), FINGERPRINT)
    agent = SearchFirstAgent(NativeRetriever(model, index), documents, k=2)
    conversation = [
        {"role": "user", "content": "I'm staying at the Avalon hotel next week."},
        {"role": "assistant", "content": "Great, how can I help?"},
        {"role": "user", "content": "Do they have free parking?"},
    ]
    result = agent.turn(conversation, max_new_tokens=12)
    assert torch.allclose(result.embedding, torch.as_tensor(model.encode(conversation)), atol=1e-4)
    assert result.answer.strip() and len(result.passages) == 2
    assert result.tokens["forward_passes"] == 1 + result.tokens["answer"]
    rendered = model.renderer.render(conversation).input_ids
    assert result.tokens["dialogue"] + result.tokens["reused"] == len(rendered) and result.tokens["reused"] > 20


def test_a_conversation_wide_static_branch_embeds_like_encode_alone_and_in_a_batch():
    model = make_model(static_dim=8, static_span="conversation")
    agent = SearchFirstAgent(NativeRetriever(model, make_index()), DOCS, k=2, passage_chars=40)
    expected = torch.as_tensor(model.encode(CONV))
    assert torch.allclose(agent.turn(CONV, max_new_tokens=2, **NO_SPECIALS).embedding, expected, atol=1e-5)
    both = agent.turns([SHORT, CONV], max_new_tokens=2, **NO_SPECIALS)
    assert torch.allclose(both[1].embedding, expected, atol=1e-5)
    assert torch.allclose(both[0].embedding, torch.as_tensor(model.encode(SHORT)), atol=1e-5)
