"""Passages' keys and values computed once, moved by rotation, reused by search-first turns."""

from __future__ import annotations

import pytest
import torch
from agent_helpers import CONV, NO_SPECIALS, SHORT, make_index, make_model
from transformers import DynamicCache

from retrieval_head.agent import NativeRetriever, PassageCache, SearchFirstAgent
from retrieval_head.agent.turn import count_forwards
from retrieval_head.core.kv_cache import output_cache

DOCS = {f"d{i}": f"passage number {i} about rooms and parking" for i in range(12)}


def cached_agent(arch: str = "llama", k: int = 2, **kwargs) -> SearchFirstAgent:
    model = make_model(arch)
    return SearchFirstAgent(NativeRetriever(model, make_index()), DOCS, k=k, passage_chars=40,
                            passage_cache=PassageCache(model, **kwargs))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("shift", [0, 9, 40])
def test_a_moved_passage_equals_the_passage_computed_at_its_new_position(arch, shift):
    model = make_model(arch)
    passages = PassageCache(model)
    text = "passage number 3 about parking"
    [states] = passages.states([text])
    segment = passages.tokenizer(passages.segment(text), add_special_tokens=False)["input_ids"]
    assert states.ids == segment and states.start == len(passages.prefix_ids)
    ids = torch.tensor([passages.prefix_ids + segment])
    positions = torch.arange(shift, shift + ids.shape[1])[None]  # the same text, `shift` positions later
    with torch.inference_mode():
        layers = output_cache(model.base_model(input_ids=ids, position_ids=positions, use_cache=True)).layers
    cache = DynamicCache()
    assert passages.extend(cache, [states], position=states.start + shift) == segment
    for mine, real in zip(cache.layers, layers, strict=True):
        assert torch.allclose(mine.keys, real.keys[:, :, -len(segment):], atol=1e-5)
        assert torch.allclose(mine.values, real.values[:, :, -len(segment):], atol=1e-5)


def test_a_turn_with_cached_passages_computes_what_plain_answering_would():
    agent = cached_agent()
    agent.prepare_passages()  # at index time, each document as the answers cite it (cut to passage_chars)
    assert len(agent.passage_cache) == len(DOCS) and agent.passage_cache.computed_passages == len(DOCS)
    with count_forwards(agent.model.base_model) as calls:
        result = agent.turn(CONV, max_new_tokens=5, **NO_SPECIALS)
    t = result.tokens
    plain = agent.tokenizer.apply_chat_template(agent.model.renderer.messages(CONV), tokenize=False,
                                                add_generation_prompt=True)
    plain_tokens = len(agent.tokenizer(plain, add_special_tokens=False)["input_ids"]) + 4
    assert t["computed"] == calls.tokens == plain_tokens - t["reused"]  # less the template prefix, computed once
    assert t["reused"] == len(agent.prefix.ids) > 0
    assert t["passages_reused"] == sum(len(s.ids) for s in agent.passage_cache.states(result.passages)) > 0
    assert t["forward_passes"] == 1 + t["answer"]  # the prefill, then generate; no passage computed
    assert agent.passage_cache.computed_passages == len(DOCS)
    assert result.cache.cache.get_seq_length() == len(result.cache.ids)
    assert all(p in result.history[-2]["content"] for p in result.passages)


def test_a_passage_seen_for_the_first_time_is_computed_in_the_turn_and_reused_after():
    agent = cached_agent()
    first = agent.turn(SHORT, max_new_tokens=3, **NO_SPECIALS)
    assert first.tokens["forward_passes"] == 1 + 1 + first.tokens["answer"]  # + one batch of new passages
    assert first.tokens["passages_first_seen"] == first.tokens["passages_reused"] > 0
    assert agent.passage_cache.computed_passages == 2
    again = agent.turn(SHORT, max_new_tokens=3, **NO_SPECIALS)
    assert again.tokens["forward_passes"] == 1 + again.tokens["answer"] and again.answer == first.answer
    assert again.tokens["passages_first_seen"] == 0
    assert agent.passage_cache.reused_passages == 2


def test_the_next_turn_reuses_the_cached_passages_and_the_dialogue():
    agent = cached_agent(k=1)
    first = agent.turn(SHORT, max_new_tokens=3, **NO_SPECIALS)
    conversation = [*first.history, {"role": "user", "content": "and is breakfast included"}]
    covered = len(first.cache.ids)  # the turn trims first.cache to what it reuses: count before
    second = agent.turn(conversation, max_new_tokens=3, cache=first.cache, **NO_SPECIALS)
    assert second.tokens["reused"] == covered > 0
    assert second.cache.cache.get_seq_length() == len(second.cache.ids)


def test_a_batch_answers_as_each_conversation_alone():
    agent = cached_agent()
    batch = agent.turns([CONV, SHORT], max_new_tokens=4, **NO_SPECIALS)
    alone = [agent.turn(c, max_new_tokens=4, **NO_SPECIALS) for c in (CONV, SHORT)]
    for b, a in zip(batch, alone, strict=True):
        assert b.doc_ids == a.doc_ids and b.answer == a.answer


def test_the_least_recently_used_passage_is_dropped_first():
    passages = PassageCache(make_model(), max_passages=2)
    passages.states(["one passage", "two passage"])
    passages.states(["one passage", "three passage"])
    passages.states(["one passage"])
    assert len(passages) == 2 and passages.reused_passages == 2 and passages.computed_passages == 3


def test_preparing_passages_needs_a_passage_cache_that_holds_them():
    with pytest.raises(ValueError, match="needs a passage_cache"):
        SearchFirstAgent(NativeRetriever(make_model(), make_index()), DOCS).prepare_passages()
    with pytest.raises(ValueError, match="do not fit the passage cache's max_passages=4"):
        cached_agent(max_passages=4).prepare_passages()


def test_bad_settings_are_clear_errors():
    from tiny import tiny_causal_lm, tiny_tokenizer

    from retrieval_head import RetrievalHeadConfig, get_retrieval_model

    model = make_model()
    with pytest.raises(ValueError, match="must contain '{passage}'"):
        PassageCache(model, passage_format="no slot")
    with pytest.raises(ValueError, match="max_passages"):
        PassageCache(model, max_passages=0)
    with pytest.raises(ValueError, match="must start with '{passages}'"):
        SearchFirstAgent(NativeRetriever(model, make_index()), DOCS, results_template="Found: {passages}",
                         passage_cache=PassageCache(model))
    with pytest.raises(ValueError, match="differs from the passage_cache's"):
        SearchFirstAgent(NativeRetriever(model, make_index()), DOCS, passage_format="<{passage}>",
                         passage_cache=PassageCache(model))
    with pytest.raises(ValueError, match="another model"):
        SearchFirstAgent(NativeRetriever(model, make_index()), DOCS, passage_cache=PassageCache(make_model()))
    gpt2 = get_retrieval_model(tiny_causal_lm("gpt2"), RetrievalHeadConfig(layer=2, output_dim=16, inner_dim=32),
                               tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="no rotary position embedding"):
        PassageCache(gpt2)


def test_a_bfloat16_base_moves_its_passages_too():
    model = make_model()
    model.base_model.to(torch.bfloat16)
    passages = PassageCache(model)
    [states] = passages.states(["passage about parking"])
    assert states.keys[0].dtype == torch.bfloat16


def test_a_peft_adapted_agent_caches_its_adapted_passages():
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_causal_lm, tiny_tokenizer

    from retrieval_head import RetrievalHeadConfig, get_retrieval_model

    lora = LoraConfig(r=2, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
    def config() -> RetrievalHeadConfig:
        return RetrievalHeadConfig(layer=2, output_dim=16, inner_dim=32, teacher=make_model().config.teacher)

    adapted = get_retrieval_model(get_peft_model(tiny_causal_lm(), lora), config(), tokenizer=tiny_tokenizer())
    plain = get_retrieval_model(tiny_causal_lm(), config(), tokenizer=tiny_tokenizer())
    [mine], [theirs] = (PassageCache(m).states(["passage about parking"]) for m in (adapted, plain))
    assert not torch.allclose(mine.keys[0], theirs.keys[0])  # the adapter's keys, not the base's
    agent = SearchFirstAgent(NativeRetriever(adapted, make_index()), DOCS, k=2, passage_chars=40,
                             passage_cache=PassageCache(adapted))
    result = agent.turn(CONV, max_new_tokens=3, **NO_SPECIALS)
    assert result.tokens["passages_reused"] > 0 and result.cache.cache.get_seq_length() == len(result.cache.ids)


def test_a_saved_cache_loads_back_and_a_turn_then_computes_no_passage(tmp_path):
    agent = cached_agent()
    agent.prepare_passages()
    before = agent.turn(CONV, max_new_tokens=4, **NO_SPECIALS)
    agent.passage_cache.save(tmp_path / "passages")
    fresh = PassageCache(agent.model)
    assert fresh.load(tmp_path / "passages") == len(DOCS) == len(fresh)
    for mine, theirs in zip(fresh.states(before.passages), agent.passage_cache.states(before.passages), strict=True):
        assert mine.ids == theirs.ids and mine.start == theirs.start
        assert all(torch.equal(a, b) for a, b in zip(mine.keys + mine.values, theirs.keys + theirs.values,
                                                     strict=True))
    again = SearchFirstAgent(agent.retriever, DOCS, k=2, passage_chars=40, passage_cache=fresh)
    after = again.turn(CONV, max_new_tokens=4, **NO_SPECIALS)
    assert after.tokens["passages_first_seen"] == 0 and fresh.computed_passages == 0
    assert after.answer == before.answer


def test_a_saved_cache_is_refused_for_another_base_format_or_a_broken_file(tmp_path):
    model = make_model()
    passages = PassageCache(model)
    passages.states(["passage about parking"])
    saved = passages.save(tmp_path / "passages")
    other_base = make_model()
    torch.nn.init.normal_(other_base.base_model.model.layers[-1].self_attn.k_proj.weight)
    with pytest.raises(ValueError, match="another base, adapter or precision"):
        PassageCache(other_base).load(saved)
    with pytest.raises(ValueError, match="saved with passage_format"):
        PassageCache(model, passage_format="[{passage}]").load(saved)
    with pytest.raises(FileNotFoundError, match="no saved passage cache"):
        PassageCache(model).load(tmp_path / "nowhere")
    (saved / "passages.safetensors").write_bytes((saved / "passages.safetensors").read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable passage cache"):
        PassageCache(model).load(saved)
