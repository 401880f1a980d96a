"""Render a text or a conversation the way the LM reads it, and find the tokens of the text itself.

The head pools over the text's own tokens (the span), read in context: for a conversation, the last user
message after the whole dialogue. Tokens after the span cannot change a causal LM's states of the span, so
the rendered input stops at the span's end. Training, `encode()` and the agent hook all render through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from retrieval_head.core.config import RetrievalHeadConfig

Message = dict[str, str]
EncodeInput = str | Sequence[Message]


@dataclass(frozen=True)
class RenderedInput:
    """Token ids of one input (cut at the span's end) and the span `[start, end)` of its text.

    `static_ranges` are the token ranges a conversation-wide static branch reads (every message's content, the
    span last); empty: the span.
    """

    input_ids: list[int]
    span_start: int
    span_end: int
    static_ranges: tuple[tuple[int, int], ...] = ()

    def static_ids(self) -> list[int]:
        """The token ids the static branch pools: those of `static_ranges`, else of the span."""
        ranges = self.static_ranges or ((self.span_start, self.span_end),)
        return [t for a, b in ranges for t in self.input_ids[a:b]]


def is_conversation(item: Any) -> bool:
    """A conversation is a non-empty list of `{"role", "content"}` messages."""
    return (
        isinstance(item, (list, tuple))
        and len(item) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in item)
    )


def check_inputs(items: Sequence[Any]) -> None:
    """Raise `TypeError` naming the first item that is neither a string nor a conversation."""
    for index, item in enumerate(items):
        if not (isinstance(item, str) or is_conversation(item)):
            raise TypeError(
                f"encode() input at index {index} is a {type(item).__name__}; expected a string or a "
                "conversation (a list of {'role': ..., 'content': ...} messages)."
            )


def padding_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token (causal LMs often have
    no pad token; padded positions are masked either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def context_length(model: Any) -> int | None:
    """The most positions a (transformers) causal LM reads, from its config, or None when it does not say."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


class QueryRenderer:
    """Turns texts and conversations into token ids + spans under a head config's template."""

    def __init__(self, tokenizer: Any, config: RetrievalHeadConfig, context_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        # Tokens kept per input: the config's max_length, capped at the base's context (positions beyond it
        # crash models with learned position embeddings, e.g. GPT-2).
        self.max_length = min(config.max_length, context_length) if context_length else config.max_length
        if config.query_template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "query_template='chat' but the tokenizer has no chat template; set "
                "RetrievalHeadConfig(query_template='plain') or give a tokenizer with a chat template."
            )

    def messages(self, item: EncodeInput, prompt: str = "") -> list[Message]:
        """The chat messages for an input; the prompt is prepended to the last message's content."""
        conversation = [{"role": "user", "content": item}] if isinstance(item, str) else [dict(m) for m in item]
        conversation[-1]["content"] = prompt + conversation[-1]["content"]
        if self.config.system_prompt is not None and conversation[0]["role"] != "system":
            conversation.insert(0, {"role": "system", "content": self.config.system_prompt})
        return conversation

    def render_text(self, item: EncodeInput, prompt: str = "") -> tuple[str, int, int]:
        """The rendered string (cut at the span's end) and the character span of the text in it."""
        conversation = self.messages(item, prompt)
        content = conversation[-1]["content"]
        if self.config.query_template == "chat":
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
            if not content:
                marker = "\x00span\x00"
                conversation[-1]["content"] = marker
                text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
                start = text.rfind(marker)
                return text[:start], start, start
            start = text.rfind(content)
            if start < 0:  # templates that trim the message
                content = content.strip()
                start = text.rfind(content)
            if start < 0:
                raise ValueError("the chat template dropped or rewrote the message text; use query_template='plain'.")
        else:
            text = "\n".join(
                m["content"] if m["role"] == "user" and i == len(conversation) - 1 else f"{m['role']}: {m['content']}"
                for i, m in enumerate(conversation)
            )
            start = len(text) - len(content)
        return text[: start + len(content)], start, start + len(content)

    def content_ranges(self, item: EncodeInput, prompt: str, text: str) -> list[tuple[int, int]]:
        """Character ranges in `text` (from `render_text`) of every message's content before the last one,
        system messages left out: what a conversation-wide static branch reads besides the span."""
        conversation = self.messages(item, prompt)[:-1]
        ranges, position = [], 0
        for i, message in enumerate(conversation):
            if self.config.query_template == "chat":
                end = len(self.tokenizer.apply_chat_template(conversation[: i + 1], tokenize=False))
                content = message["content"].strip()
                start = text.rfind(content, position, end) if content else -1
                if start >= 0:
                    position = start + len(content)
            else:
                line = f"{message['role']}: {message['content']}"
                start, position = position + len(message["role"]) + 2, position + len(line) + 1
                content = message["content"]
            if message["role"] != "system" and start >= 0 and content:
                ranges.append((start, start + len(content)))
        return ranges

    def render(self, item: EncodeInput, prompt: str = "") -> RenderedInput:
        """Token ids and token span of one input, truncated to `max_length` (history dropped first)."""
        text, char_start, char_end = self.render_text(item, prompt)
        conversation_wide = self.config.static_span == "conversation" and not isinstance(item, str)
        history = self.content_ranges(item, prompt, text) if conversation_wide else []
        ids, token_ranges = self._tokenize_with_ranges(text, [(char_start, char_end), *history])
        (start, end), history_tokens = token_ranges[0], token_ranges[1:]
        if not ids:  # an empty plain text: read one special token, as an empty sentence reads [CLS]
            ids = [next(t for t in self._special_ids() if t is not None)]
            start, end = 0, 1
        max_length = self.max_length
        end = min(end, start + max_length)
        first = max(0, end - max_length)
        ids = ids[first:end]
        start, end = start - first, end - first
        if start >= end:  # empty text: read the state of the token just before it
            start = end - 1
        static = ()
        if conversation_wide:
            kept = [(max(a - first, 0), min(b - first, start)) for a, b in history_tokens]
            static = (*[(a, b) for a, b in kept if a < b], (start, end))
        return RenderedInput(ids, start, end, static)

    def _special_ids(self) -> tuple[int | None, ...]:
        tok = self.tokenizer
        return tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, 0

    def _tokenize_with_ranges(
        self, text: str, char_ranges: Sequence[tuple[int, int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and the token range of each character range (the span first). A slow tokenizer
        gives the span alone (it has no offsets)."""
        char_start, char_end = char_ranges[0]
        if getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            ranges = []
            for lo, hi in char_ranges:
                inside = [i for i, (a, b) in enumerate(offsets) if b > lo and a < hi and b > a]
                ranges.append((inside[0], inside[-1] + 1) if inside else (len(ids), len(ids)))
            return ids, ranges
        prefix = self.tokenizer(text[:char_start], add_special_tokens=False)["input_ids"]
        body = self.tokenizer(text[char_start:char_end], add_special_tokens=False)["input_ids"]
        return prefix + body, [(len(prefix), len(prefix) + len(body))]

    def collate(self, rendered: Sequence[RenderedInput], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Right-padded `input_ids`, `attention_mask` and `span_mask` (positions stay those of each input alone),
        and `static_mask` where an input has `static_ranges` (a conversation-wide static branch)."""
        length = max(len(r.input_ids) for r in rendered)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0
        input_ids = torch.full((len(rendered), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rendered), length), dtype=torch.long)
        span_mask = torch.zeros((len(rendered), length), dtype=torch.long)
        for row, r in enumerate(rendered):
            input_ids[row, : len(r.input_ids)] = torch.tensor(r.input_ids, dtype=torch.long)
            attention_mask[row, : len(r.input_ids)] = 1
            span_mask[row, r.span_start : r.span_end] = 1
        batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
                 "span_mask": span_mask.to(device)}
        if any(r.static_ranges for r in rendered):
            static_mask = span_mask.clone()
            for row, r in enumerate(rendered):
                for a, b in r.static_ranges:
                    static_mask[row, a:b] = 1
            batch["static_mask"] = static_mask.to(device)
        return batch
