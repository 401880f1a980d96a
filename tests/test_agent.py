"""The agent hook: query embedded from generation's own states, no extra pass, same as a re-run forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import save_tiny, tiny_causal_lm, tiny_tokenizer

from retrieval_head import RetrievalHeadConfig, get_retrieval_model
from retrieval_head.agent import EmptyQuerySpanError, NativeRetriever, find_capture_point
from retrieval_head.fingerprint import TeacherFingerprint, TeacherMismatchError
from retrieval_head.index import DocumentIndex

DIM = 16
NO_SPECIALS = {"suppress_tokens": [0, 1, 2]}  # random tiny LMs would otherwise end turns at random
CONV = [
    {"role": "user", "content": "is breakfast included in the price of the room"},
    {"role": "assistant", "content": "yes it is"},
    {"role": "user", "content": "do they allow pets"},
]
SHORT = [{"role": "user", "content": "where can I park my car"}]
FINGERPRINT = TeacherFingerprint("tiny-teacher", None, DIM, "cosine", True, "a" * 64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and don't fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(arch: str = "llama", layer: int = 2, head_type: str = "mlp", teacher=FINGERPRINT):
    config = RetrievalHeadConfig(layer=layer, output_dim=DIM, inner_dim=32, head_type=head_type, num_attention_heads=4,
                                 teacher=teacher.to_dict() if teacher else None)
    return get_retrieval_model(tiny_causal_lm(arch), config, tokenizer=tiny_tokenizer())


def make_index(fingerprint=FINGERPRINT, n: int = 12) -> DocumentIndex:
    vectors = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    return DocumentIndex.from_embeddings(vectors, [f"d{i}" for i in range(n)], fingerprint)


def script(tokenizer, text: str, prompt_width: int):
    """`prefix_allowed_tokens_fn` that makes the LM write `text` then end its turn."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def allowed(batch_id, input_ids):
        step = input_ids.shape[-1] - prompt_width
        return [ids[min(step, len(ids) - 1)]]

    return allowed


def rerun_embedding(agent: NativeRetriever, result) -> torch.Tensor:
    """The head over the same tokens (prompt + generated) in ONE forward, span mask at the same tokens."""
    model = agent.model
    ids = result.prompt_ids + result.generated_ids[: result.span.end]
    with torch.inference_mode():
        states = model.layer_states(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    mask = torch.zeros(1, len(ids), dtype=torch.long)
    offset = len(result.prompt_ids)
    mask[0, offset + result.span.start : offset + result.span.end] = 1
    with torch.inference_mode():
        return model.embed_hidden_states(states, mask)[0]


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


def test_markers_found_and_query_text():
    model = make_model()
    agent = NativeRetriever(model, make_index())
    width = len(agent.prompt_ids(SHORT))
    fn = script(model.tokenizer, "parking near the hotel</query> let me look", width)
    result = agent.generate_and_search(SHORT, k=4, max_new_tokens=30, prefix_allowed_tokens_fn=fn)
    assert result.used_markers and result.span.source == "markers" and result.note is None
    assert result.query_text == "parking near the hotel"
    assert result.generated_text.startswith("parking near the hotel</query>")
    assert "let me look" not in result.generated_text  # stopped at the close marker
    assert (result.query_embedding - rerun_embedding(agent, result)).abs().max().item() < 1e-4
    assert len(result.doc_ids) == 4 and result.scores == sorted(result.scores, reverse=True)


def test_markers_written_by_the_lm_without_prefill():
    model = make_model()
    agent = NativeRetriever(model, make_index(), prefill_open_marker=False, open_marker="[Q]", close_marker="[/Q]")
    width = len(agent.prompt_ids(SHORT))
    fn = script(model.tokenizer, "sure [Q] pets in the guest house [/Q]", width)
    result = agent.generate_and_search(SHORT, max_new_tokens=30, prefix_allowed_tokens_fn=fn)
    assert result.used_markers and result.query_text == "pets in the guest house"
    assert (result.query_embedding - rerun_embedding(agent, result)).abs().max().item() < 1e-4


def test_no_markers_falls_back_to_whole_turn():
    model = make_model()
    agent = NativeRetriever(model, make_index(), prefill_open_marker=False)
    width = len(agent.prompt_ids(SHORT))
    fn = script(model.tokenizer, "the hotel has parking", width)
    result = agent.generate_and_search(SHORT, max_new_tokens=30, prefix_allowed_tokens_fn=fn)
    assert not result.used_markers and result.span.source == "whole_turn"
    assert "whole generated turn" in result.note
    assert result.query_text == "the hotel has parking"
    assert (result.query_embedding - rerun_embedding(agent, result)).abs().max().item() < 1e-4


def test_last_token_without_state_is_left_out_and_said():
    model = make_model()
    agent = NativeRetriever(model, make_index(), prefill_open_marker=False)
    result = agent.generate_and_search(SHORT, max_new_tokens=5, min_new_tokens=5, **NO_SPECIALS)
    assert result.span.tokens_without_state == 1 and result.span.end == 4
    assert "no state" in result.note


def test_empty_query_span_is_an_error():
    model = make_model()
    agent = NativeRetriever(model, make_index())
    fn = script(model.tokenizer, "</query> nothing", len(agent.prompt_ids(SHORT)))
    with pytest.raises(EmptyQuerySpanError, match="empty"):
        agent.generate_and_search(SHORT, max_new_tokens=20, prefix_allowed_tokens_fn=fn)


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
                 "--json"])
    assert code == 0
    import json

    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["hits"] and out["hits"][0]["doc_id"].startswith("d") and "answer" in out
    assert out["hits"][0]["title"].startswith("Doc ")


@pytest.mark.real_model
def test_embedded_smollm2_writes_a_query_and_capture_matches(embedded_agent):
    from retrieval_head.defaults import AGENT_ID

    base, tokenizer = embedded_agent
    config = RetrievalHeadConfig(layer=-8, output_dim=384, head_type="linear", base_model_name_or_path=AGENT_ID)
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
