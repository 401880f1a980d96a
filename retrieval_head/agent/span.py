"""Find the search query among the tokens the LM generated: between the markers, else the whole turn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

SpanSource = Literal["markers", "open_marker", "whole_turn"]


class EmptyQuerySpanError(ValueError):
    """The query the LM wrote has no tokens (e.g. `<query></query>`): there is nothing to embed."""


@dataclass(frozen=True)
class QuerySpan:
    """Where the query is: generated-token indices `[start, end)` and characters in the assistant text."""

    start: int
    end: int
    char_start: int
    char_end: int
    source: SpanSource
    tokens_without_state: int = 0
    """Span tokens dropped because generation stopped right after them (their state was never computed)."""


def token_char_offsets(tokenizer: Any, ids: Sequence[int], prefix: str = "") -> tuple[str, list[tuple[int, int]]]:
    """Decoded text (after `prefix`) and each token's character range in `prefix + text`."""
    offsets, previous = [], len(prefix)
    for i in range(len(ids)):
        end = len(prefix) + len(
            tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )
        end = max(end, previous)
        offsets.append((previous, end))
        previous = end
    text = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text, offsets


def _strip_range(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def find_query_span(
    tokenizer: Any,
    generated: list[int],
    available: int,
    prefix: str,
    open_marker: str,
    close_marker: str,
    row: int = 0,
) -> tuple[QuerySpan, str, str | None]:
    """The query's span among `generated` tokens, the assistant text (`prefix` + decoded) and a fallback note.

    The query runs between the markers; without a close marker, to the end of the turn; without an open
    marker, the whole turn is the query (the note says which). Only the first `available` tokens have a state
    (generation computes a token's state when it feeds the token back); later span tokens are left out and
    the note says so. Raises `EmptyQuerySpanError` when no query token is left.
    """
    special = set(tokenizer.all_special_ids)
    end_of_turn = next((i for i, t in enumerate(generated) if t in special), len(generated))
    text, offsets = token_char_offsets(tokenizer, generated[:end_of_turn], prefix)
    text = prefix + text
    note = None
    open_at = text.find(open_marker)
    if open_at >= 0:
        content_start = open_at + len(open_marker)
        close_at = text.find(close_marker, content_start)
        if close_at >= 0:
            source: SpanSource = "markers"
            char_start, char_end = content_start, close_at
        else:
            source = "open_marker"
            char_start, char_end = content_start, len(text)
            note = (f"the LM did not close the query with {close_marker!r}; the query runs from "
                    f"{open_marker!r} to the end of the generated text")
    else:
        source = "whole_turn"
        char_start, char_end = len(prefix), len(text)
        note = f"the LM wrote no {open_marker!r} marker; the whole generated turn is the query"
    char_start, char_end = _strip_range(text, char_start, char_end)
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and b > char_start and a < char_end]
    if not inside:
        raise EmptyQuerySpanError(
            f"conversation {row}: the query the LM wrote is empty ({source}); generated text: "
            f"{text[len(prefix):]!r}. Nothing to embed — raise max_new_tokens or adjust the instruction."
        )
    start, end = inside[0], inside[-1] + 1
    dropped = max(0, end - available)
    end = min(end, available)
    if end <= start:
        raise EmptyQuerySpanError(
            f"conversation {row}: generation stopped right after the query's only token, so its state was "
            "never computed; raise max_new_tokens"
        )
    if dropped:
        extra = f"the last {dropped} query token(s) have no state (generation stopped on them) and are left out"
        note = f"{note}; {extra}" if note else extra
    return QuerySpan(start, end, char_start, char_end, source, dropped), text, note
