"""What the agent is asked to write its search query with: the instruction, the markers, the rendered prompt."""

from __future__ import annotations

from dataclasses import dataclass

from retrieval_head.core.templates import RenderedInput

DEFAULT_OPEN = "<query>"
DEFAULT_CLOSE = "</query>"
DEFAULT_INSTRUCTION = (
    "Rewrite my last message as one short, standalone search query that names the place or thing we are talking "
    "about. Write it between {open} and {close}."
)  # chosen on DSTC11 dev dialogues (training/EXPERIMENTS.md): SmolLM2-135M copied any example query verbatim


@dataclass(frozen=True)
class QueryPrompt:
    """Token ids of the query prompt and the span `[start, end)` of the last message's text in them (None when
    the head's template does not render the conversation as a prefix of the chat prompt)."""

    input_ids: list[int]
    user_span: tuple[int, int] | None
    rendered: RenderedInput | None = None  # the conversation as `model.encode` renders it (a wide static branch)
