"""What the agent returns: hits, the query's span, one turn's result, reusable KV caches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from retrieval_head.agent.span import QuerySpan


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float


@dataclass
class TurnCache:
    """A KV cache and the token ids it covers, to reuse across calls (the longest common prefix is kept)."""

    ids: list[int]
    cache: Any
    text: str | None = None
    """The text those ids render (search-first turns): a next prompt starting with it reuses every id."""


@dataclass
class AgentResult:
    """One generate-and-search turn."""

    query_text: str
    query_embedding: torch.Tensor
    hits: list[Hit]
    span: QuerySpan
    used_markers: bool
    generated_text: str
    generated_ids: list[int]
    prompt_ids: list[int]
    note: str | None = None
    cache: TurnCache | None = None
    timings: dict[str, float] = field(default_factory=dict)
    assistant_prefix: str = ""
    """What the assistant turn started with before generation (the prefilled open marker, or "")."""
    user_turn_embedding: torch.Tensor | None = None
    """The last message's embedding from the same `generate()`'s prefill states (equals `model.encode(messages)`),
    or None when the head's template does not render the conversation as the prompt's prefix."""
    searched_with: str = "query"
    """Which embedding the hits come from: "query" (the LM's query) or "user_turn"."""

    @property
    def doc_ids(self) -> list[str]:
        return [h.doc_id for h in self.hits]

    @property
    def scores(self) -> list[float]:
        return [h.score for h in self.hits]

    @property
    def search_embedding(self) -> torch.Tensor:
        """The embedding the index was searched with (see `searched_with`)."""
        if self.searched_with == "user_turn" and self.user_turn_embedding is not None:
            return self.user_turn_embedding
        return self.query_embedding

    @property
    def assistant_text(self) -> str:
        """The whole assistant turn (the prefilled open marker, if any, + what the LM wrote)."""
        return self.assistant_prefix + self.generated_text


@dataclass
class ConversationEmbedding:
    """`embed_conversation` output: the embedding of the last user turn and, optionally, the prefill cache."""

    embedding: torch.Tensor
    input_ids: list[int]
    span_start: int
    span_end: int
    cache: TurnCache | None = None
