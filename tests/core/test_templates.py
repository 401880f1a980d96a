"""Tests for retrieval_head.core.templates: chat rendering, the text's own span, truncation from the left."""

from __future__ import annotations

import pytest
import torch
from core_helpers import one_thread, small_config, tokenizer
from tiny import tiny_causal_lm

from retrieval_head.core.templates import QueryRenderer, check_inputs, context_length, is_conversation

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

CONVERSATION = [
    {"role": "user", "content": "is there a hotel near the restaurant"},
    {"role": "assistant", "content": "yes the guest house is near"},
    {"role": "user", "content": "do they allow pets"},
]


def renderer(**overrides) -> QueryRenderer:
    return QueryRenderer(tokenizer(chat=True), small_config(**overrides))


def span_text(r: QueryRenderer, rendered) -> str:
    return r.tokenizer.decode(rendered.input_ids[rendered.span_start : rendered.span_end])


def test_is_conversation() -> None:
    assert is_conversation(CONVERSATION)
    assert is_conversation(tuple(CONVERSATION))
    assert not is_conversation([])
    assert not is_conversation("text")
    assert not is_conversation(["a", "b"])
    assert not is_conversation([{"role": "user"}])


@pytest.mark.parametrize(("items", "index", "type_name"), [(["a", 3], 1, "int"), ([None], 0, "NoneType"),
                                                         (["a", "b", b"c"], 2, "bytes"), (["a", {"x": 1}], 1, "dict")])
def test_check_inputs_names_the_index(items, index: int, type_name: str) -> None:
    with pytest.raises(TypeError, match=rf"index {index} is a {type_name}"):
        check_inputs(items)


def test_check_inputs_accepts_texts_and_conversations() -> None:
    check_inputs(["a", "", CONVERSATION])


def test_chat_template_is_required_for_chat() -> None:
    with pytest.raises(ValueError, match="query_template='plain'"):
        QueryRenderer(tokenizer(chat=False), small_config(query_template="chat"))
    QueryRenderer(tokenizer(chat=False), small_config(query_template="plain"))


def test_text_is_rendered_with_the_chat_template_and_cut_at_its_end() -> None:
    r = renderer()
    text, start, end = r.render_text("where can I park")
    assert text == "<|im_start|>user\nwhere can I park"
    assert text[start:end] == "where can I park" and end == len(text)


@pytest.mark.parametrize("text", ["where can I park", "hi", "is breakfast included in the price?", "x  y "])
def test_span_covers_only_the_texts_own_tokens(text: str) -> None:
    r = renderer()
    rendered = r.render(text)
    assert span_text(r, rendered) == text
    assert rendered.span_end == len(rendered.input_ids)
    before = r.tokenizer.decode(rendered.input_ids[: rendered.span_start])
    assert before == "<|im_start|>user\n"


def test_conversation_renders_history_and_spans_the_last_message() -> None:
    r = renderer()
    text, start, end = r.render_text(CONVERSATION)
    assert text.startswith("<|im_start|>user\nis there a hotel near the restaurant<|im_end|>\n")
    assert "<|im_start|>assistant\nyes the guest house is near<|im_end|>\n" in text
    assert text[start:end] == "do they allow pets" and end == len(text)
    rendered = r.render(CONVERSATION)
    assert span_text(r, rendered) == "do they allow pets"


def test_conversation_input_is_not_mutated() -> None:
    conversation = [dict(m) for m in CONVERSATION]
    renderer(system_prompt="Be brief.").render(conversation, prompt="q: ")
    assert conversation == CONVERSATION


def test_system_prompt_and_prompt() -> None:
    r = renderer(system_prompt="Be brief.")
    text, start, end = r.render_text("where can I park", prompt="q: ")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text[start:end] == "q: where can I park"
    assert span_text(r, r.render("where can I park", prompt="q: ")) == "q: where can I park"


def test_plain_template() -> None:
    r = renderer(query_template="plain")
    text, start, end = r.render_text(CONVERSATION)
    assert text == (
        "user: is there a hotel near the restaurant\nassistant: yes the guest house is near\ndo they allow pets"
    )
    assert text[start:end] == "do they allow pets"
    assert span_text(r, r.render("where can I park")) == "where can I park"


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_empty_text_reads_one_token(template: str) -> None:
    r = renderer(query_template=template)
    rendered = r.render("")
    assert rendered.span_end - rendered.span_start == 1
    assert 0 <= rendered.span_start < rendered.span_end <= len(rendered.input_ids)


def test_long_history_is_cut_from_the_left_and_the_question_kept() -> None:
    long_history = [{"role": "user", "content": "the restaurant serves vegetarian food " * 20},
                    {"role": "assistant", "content": "what is the capital of France " * 20}]
    conversation = [*long_history, {"role": "user", "content": "do they allow pets"}]
    full = renderer(max_length=4096).render(conversation)
    r = renderer(max_length=12)
    cut = r.render(conversation)
    assert len(full.input_ids) > 100
    assert len(cut.input_ids) == 12
    assert cut.input_ids == full.input_ids[-12:]
    assert span_text(r, cut) == "do they allow pets"


def test_text_longer_than_max_length_keeps_its_first_tokens() -> None:
    r = renderer(query_template="plain", max_length=5)
    text = "where can I park my car near the hotel and is breakfast included"
    full = renderer(query_template="plain", max_length=512).render(text)
    cut = r.render(text)
    assert cut.input_ids == full.input_ids[:5] and (cut.span_start, cut.span_end) == (0, 5)


def test_context_length_caps_max_length() -> None:
    r = QueryRenderer(tokenizer(chat=False), small_config(query_template="plain", max_length=512), context_length=20)
    assert r.max_length == 20
    assert len(r.render("where can I park my car near the hotel " * 30).input_ids) == 20


@pytest.mark.parametrize(("arch", "positions"), [("llama", 256), ("gpt2", 256)])
def test_context_length_of_a_base(arch: str, positions: int) -> None:
    assert context_length(tiny_causal_lm(arch)) == positions
    assert context_length(torch.nn.Linear(2, 2)) is None


def test_collate_right_pads_and_marks_spans() -> None:
    r = renderer()
    rendered = [r.render("hi"), r.render("where can I park my car"), r.render(CONVERSATION)]
    batch = r.collate(rendered)
    lengths = [len(x.input_ids) for x in rendered]
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, x in enumerate(rendered):
        assert batch["input_ids"][row, : lengths[row]].tolist() == x.input_ids
        assert batch["attention_mask"][row].tolist() == [1] * lengths[row] + [0] * (max(lengths) - lengths[row])
        assert batch["span_mask"][row].nonzero().flatten().tolist() == list(range(x.span_start, x.span_end))
        assert (batch["input_ids"][row, lengths[row]:] == r.tokenizer.pad_token_id).all()


def ranges_text(r: QueryRenderer, rendered) -> list[str]:
    return [r.tokenizer.decode(rendered.input_ids[a:b]) for a, b in rendered.static_ranges]


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_conversation_wide_static_span_covers_every_message_content(template: str) -> None:
    r = renderer(query_template=template, static_span="conversation", system_prompt="Be brief.")
    rendered = r.render(CONVERSATION)
    assert ranges_text(r, rendered) == [m["content"] for m in CONVERSATION]  # the system prompt left out
    assert rendered.static_ranges[-1] == (rendered.span_start, rendered.span_end)
    ids = [t for a, b in rendered.static_ranges for t in rendered.input_ids[a:b]]
    assert rendered.static_ids() == ids
    assert r.render("where can I park").static_ranges == ()  # a text reads its span either way


def test_text_static_span_reads_the_span_only() -> None:
    r = renderer()
    rendered = r.render(CONVERSATION)
    assert rendered.static_ranges == ()
    assert rendered.static_ids() == rendered.input_ids[rendered.span_start : rendered.span_end]


def test_conversation_wide_static_span_repeated_content_finds_each_message() -> None:
    r = renderer(static_span="conversation")
    conversation = [{"role": "user", "content": "pets"}, {"role": "assistant", "content": "pets"},
                    {"role": "user", "content": "pets"}]
    rendered = r.render(conversation)
    starts = [a for a, _ in rendered.static_ranges]
    assert len(starts) == 3 and starts == sorted(set(starts))


def test_conversation_wide_static_span_is_cut_with_the_history() -> None:
    long_history = [{"role": "user", "content": "the restaurant serves vegetarian food " * 20},
                    {"role": "assistant", "content": "yes the guest house is near"}]
    conversation = [*long_history, {"role": "user", "content": "do they allow pets"}]
    full = renderer(static_span="conversation", max_length=4096).render(conversation)
    rendered = renderer(static_span="conversation", max_length=24).render(conversation)
    first = len(full.input_ids) - 24
    assert rendered.input_ids == full.input_ids[first:]
    assert rendered.static_ranges == tuple((max(a - first, 0), b - first) for a, b in full.static_ranges
                                           if b > first)
    assert len(rendered.static_ranges) < len(full.static_ranges)  # the first message fell out with the history


def test_collate_marks_the_static_ranges() -> None:
    r = renderer(static_span="conversation")
    rendered = [r.render("hi"), r.render(CONVERSATION)]
    batch = r.collate(rendered)
    assert batch["static_mask"][0].tolist() == batch["span_mask"][0].tolist()
    marked = batch["static_mask"][1].nonzero().flatten().tolist()
    assert marked == [i for a, b in rendered[1].static_ranges for i in range(a, b)]
    assert "static_mask" not in renderer().collate(rendered[:1])
