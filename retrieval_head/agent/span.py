"""Find the search query among the tokens the LM generated: between the markers, else the whole turn."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from retrieval_head.core.errors import RetrievalHeadError

SpanSource = Literal["markers", "open_marker", "whole_turn"]


class EmptyQuerySpanError(RetrievalHeadError, ValueError):
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


class PrefixLengths:
    """`len(prefix + decode(ids[:i]))` for any `i`, decoded on demand and remembered.

    The query's boundaries are found by bisection over these lengths (a decoded prefix never gets shorter but
    for a multi-byte character split across tokens), so a span costs O(log n) decodes rather than one per token.
    """

    def __init__(self, tokenizer: Any, ids: Sequence[int], prefix: str = "") -> None:
        self.tokenizer, self.ids, self.prefix = tokenizer, list(ids), prefix
        self._lengths: dict[int, int] = {0: len(prefix)}

    def text(self, i: int | None = None) -> str:
        """`prefix` + the decoded first `i` tokens (all of them by default)."""
        i = len(self.ids) if i is None else i
        text = self.prefix + self.tokenizer.decode(self.ids[:i], skip_special_tokens=True,
                                                   clean_up_tokenization_spaces=False)
        self._lengths[i] = len(text)
        return text

    def __call__(self, i: int) -> int:
        return self._lengths[i] if i in self._lengths else len(self.text(i))

    def first(self, condition: Callable[[int], bool], lo: int = 0) -> int:
        """The smallest `i` in [lo, len(ids)] with `condition(length(i))`, or len(ids) + 1 when there is none."""
        n = len(self.ids)
        found = bisect.bisect_left(range(lo, n + 1), True, key=lambda i: condition(self(i)))
        return lo + found if lo + found <= n else n + 1


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
    lengths = PrefixLengths(tokenizer, generated[:end_of_turn], prefix)
    text = lengths.text()
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
    # first token ending after the query starts; the tokens up to the first prefix that reaches its end
    start = lengths.first(lambda length: length > char_start, lo=1) - 1
    end = lengths.first(lambda length: length >= char_end, lo=start + 1) if start < end_of_turn else start
    if char_start >= char_end or start >= end_of_turn:
        raise EmptyQuerySpanError(
            f"conversation {row}: the query the LM wrote is empty ({source}); generated text: "
            f"{text[len(prefix):]!r}. Nothing to embed — raise max_new_tokens or adjust the instruction."
        )
    end = min(end, end_of_turn)
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


def token_span(tokenizer: Any, text: str, char_start: int, char_end: int) -> tuple[list[int], int, int]:
    """Token ids of `text` and the token span `[start, end)` covering its characters `[char_start, char_end)`."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > char_start and a < char_end and b > a]
    if not inside:
        raise ValueError("the last user message has no tokens: there is nothing to search for")
    return list(enc["input_ids"]), inside[0], inside[-1] + 1
