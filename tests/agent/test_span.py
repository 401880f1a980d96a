"""Finding the query among the generated tokens: markers, fallbacks, tokens without a state, empty queries."""

from __future__ import annotations

import pytest
from agent_helpers import NO_SPECIALS, SHORT, make_index, make_model, rerun_embedding, script
from tiny import tiny_tokenizer

from retrieval_head.agent import EmptyQuerySpanError, NativeRetriever, find_query_span


def test_find_query_span_between_markers_and_fallbacks():
    tok = tiny_tokenizer()
    ids = tok("parking near the hotel</query> more", add_special_tokens=False)["input_ids"]
    span, text, note = find_query_span(tok, ids, len(ids), "<query>", "<query>", "</query>")
    assert span.source == "markers" and note is None
    assert text[span.char_start : span.char_end] == "parking near the hotel"
    assert tok.decode(ids[span.start : span.end]).strip() == "parking near the hotel"
    span, text, note = find_query_span(tok, ids, len(ids), "", "[Q]", "[/Q]")
    assert span.source == "whole_turn" and "no '[Q]' marker" in note and span.start == 0


def test_find_query_span_stops_at_the_end_of_turn_token():
    tok = tiny_tokenizer()
    ids = tok("pets allowed", add_special_tokens=False)["input_ids"]
    after = tok("ignored words", add_special_tokens=False)["input_ids"]
    span, text, _ = find_query_span(tok, [*ids, tok.eos_token_id, *after], 99, "<query>", "<query>", "</query>")
    assert span.source == "open_marker" and text == "<query>pets allowed" and span.end == len(ids)


def test_find_query_span_without_any_token_is_an_error():
    tok = tiny_tokenizer()
    ids = tok("</query> rest", add_special_tokens=False)["input_ids"]
    with pytest.raises(EmptyQuerySpanError, match="empty"):
        find_query_span(tok, ids, len(ids), "<query>", "<query>", "</query>")


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


def per_token_span(tokenizer, ids, char_start, char_end, prefix):
    """The reference: decode every prefix, keep the non-empty tokens that overlap the characters."""
    inside, previous = [], len(prefix)
    for i in range(len(ids)):
        end = max(previous, len(prefix) + len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True,
                                                               clean_up_tokenization_spaces=False)))
        if end > previous and end > char_start and previous < char_end:
            inside.append(i)
        previous = end
    return inside[0], inside[-1] + 1


@pytest.mark.real_model
@pytest.mark.parametrize("text", [
    "Café Müller opening hours</query> thanks",
    "  東京 hotels near the station</query>",
    "The Acorn guest house has free wifi and parking.",
    "<query>naïve résumé tips</query> ok",
])
def test_bisection_finds_the_same_tokens_as_decoding_every_prefix(embedded_agent, text):
    _, tokenizer = embedded_agent
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for prefix in ("<query>", ""):
        span, full, _ = find_query_span(tokenizer, ids, len(ids), prefix, "<query>", "</query>")
        assert (span.start, span.end) == per_token_span(tokenizer, ids, span.char_start, span.char_end, prefix)
        assert full[span.char_start : span.char_end].strip() in tokenizer.decode(ids[span.start : span.end])
