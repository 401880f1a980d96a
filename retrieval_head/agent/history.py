"""A chat's earlier turns as a KV cache: what a running agent holds before the user's next message arrives."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from retrieval_head.agent.results import TurnCache
from retrieval_head.core.kv_cache import cache_only, output_cache
from retrieval_head.core.model import RetrievalModel
from retrieval_head.core.templates import Message, is_conversation


def template_prefix(model: RetrievalModel) -> tuple[str, list[int]]:
    """(text, token ids) the head's chat rendering writes before any conversation's first user message (the
    system prompt and the user marker): the same at the start of every conversation."""
    text, start, _ = model.renderer.render_text([{"role": "user", "content": "x"}])
    return text[:start], model.tokenizer(text[:start], add_special_tokens=False)["input_ids"]


def prefill_history(model: RetrievalModel, messages: Sequence[Message]) -> TurnCache:
    """The KV cache of a conversation so far, rendered as the head renders it (no generation prompt).

    A next `SearchFirstAgent.turn(messages + [user message], cache=...)` or `NativeRetriever.generate_and_search(...,
    cache=...)` computes only what follows it: e.g. a stored history prefilled while the user types.
    """
    if not is_conversation(messages):
        raise ValueError("prefill() needs a non-empty conversation (a list of {'role': ..., 'content': ...})")
    if model.config.query_template != "chat":
        raise ValueError("prefill() renders the conversation with the chat template; this head uses "
                         f"query_template={model.config.query_template!r}")
    tokenizer = model.tokenizer
    text = tokenizer.apply_chat_template(model.renderer.messages(list(messages)), tokenize=False,
                                         add_generation_prompt=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        out = model.base_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True,
                               **cache_only(model.base_model))
    return TurnCache(list(ids), output_cache(out), text=text)
