"""`NativeRetriever`: the LM writes its own search query and the head embeds it from generation's own states.

The prompt is the conversation as `model.encode` renders it, then the instruction (appended to the last
message) and the assistant header, so one `generate()` computes, at the head's layer:
- the states of the last user message, exactly as `model.encode(conversation)` reads it (causal attention:
  what follows cannot change them) -> `user_turn_embedding`, the turn as the head was trained to read it;
- the states of the query the LM writes between the markers -> `query_embedding`.
The capture (`capture.LayerCapture`) keeps just those positions; no second model runs and the LM makes no
extra pass: each generated token's state is computed anyway when the token is fed back to the model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch

from retrieval_head.adapters.encode_adapter import EncodeAdapterError, has_encode_adapter
from retrieval_head.agent.capture import LayerCapture, find_capture_point
from retrieval_head.agent.history import prefill_history
from retrieval_head.agent.prompts import DEFAULT_CLOSE, DEFAULT_INSTRUCTION, DEFAULT_OPEN, QueryPrompt
from retrieval_head.agent.results import AgentResult, ConversationEmbedding, Hit, TurnCache
from retrieval_head.agent.span import EmptyQuerySpanError, find_query_span, token_span
from retrieval_head.core.base import base_of
from retrieval_head.core.kv_cache import cache_kwarg, cache_only, output_cache
from retrieval_head.core.model import RetrievalModel
from retrieval_head.core.templates import Message, is_conversation, padding_id
from retrieval_head.retrieval.fingerprint import TeacherFingerprint, TeacherMismatchError

SearchWith = Literal["query", "user_turn"]


class NativeRetriever:
    """An agent LM (a `RetrievalModel`) that searches `index` with queries embedded from its own states.

    Args:
        model: the LM + head. Its tokenizer must have a chat template (the prompt is a chat).
        index: a `DocumentIndex` built by the head's teacher (checked), or None to only embed.
        open_marker / close_marker: what the query is written between.
        instruction: what asks the LM for the query (`{open}`/`{close}` are filled in); it is appended to the
            last message, after the text the head reads.
        prefill_open_marker: start the assistant turn with `open_marker` so the LM writes the query at once.
        check_teacher: refuse an index whose teacher fingerprint differs from `model.config.teacher`.
        search_with: which embedding searches the index: "user_turn" (default: the last user message, from the
            same generation's prefill states, read as the head was trained to read it) or "query" (the
            query the LM wrote). Both are in every result. The default was chosen on DSTC11 dev dialogues,
            where the shipped head keeps 98% of the teacher's nDCG@10 (teacher on the dialogue) with the user
            turn and 42% with the queries SmolLM2-135M writes (benchmarks/results/agent_retention_dev.md).

    A model with an encode adapter (`retrieval_head.adapters.encode_adapter`) is refused with `EncodeAdapterError`:
    its head reads adapted states, which generation (adapter off) does not compute.
    """

    def __init__(
        self,
        model: RetrievalModel,
        index: Any = None,
        open_marker: str = DEFAULT_OPEN,
        close_marker: str = DEFAULT_CLOSE,
        instruction: str = DEFAULT_INSTRUCTION,
        prefill_open_marker: bool = True,
        check_teacher: bool = True,
        search_with: SearchWith = "user_turn",
    ) -> None:
        if search_with not in ("query", "user_turn"):
            raise ValueError(f"search_with must be 'query' or 'user_turn', got {search_with!r}")
        if not open_marker or not close_marker:
            raise ValueError("open_marker and close_marker must be non-empty strings")
        if model.tokenizer is None or not getattr(model.tokenizer, "chat_template", None):
            raise ValueError("NativeRetriever needs a RetrievalModel whose tokenizer has a chat template")
        if has_encode_adapter(model):
            raise EncodeAdapterError(
                "NativeRetriever reuses the states generation computes, but this head was trained with an encode "
                "adapter (a LoRA on only while encoding), so generation's states are not the ones it reads. Embed "
                "the query the LM wrote with model.encode(text) instead (an extra LM pass with the adapter on), "
                "or use a head trained without an encode adapter."
            )
        self.model = model
        self.tokenizer = model.tokenizer
        self.index = index
        self.open_marker, self.close_marker = open_marker, close_marker
        self.instruction = instruction.format(open=open_marker, close=close_marker) if instruction else ""
        self.prefill_open_marker = prefill_open_marker
        self.search_with = search_with
        if index is not None:
            self._check_index(index, check_teacher)
        self.capture_point = find_capture_point(model)
        self.cache_kwarg = cache_kwarg(base_of(model.base_model))

    def _check_index(self, index: Any, check_teacher: bool) -> None:
        dim = getattr(index, "dim", None)
        if dim is not None and dim != self.model.config.output_dim:
            raise TeacherMismatchError(
                f"the index holds {dim}-dim vectors but the head outputs {self.model.config.output_dim}-dim ones; "
                "use an index built by the head's teacher"
            )
        if not check_teacher:
            return
        recorded = self.model.config.teacher
        if not recorded:
            raise TeacherMismatchError(
                "the head's config records no teacher fingerprint, so the index cannot be checked against it; "
                "train/save the head with its teacher recorded, or pass check_teacher=False to skip the check"
            )
        index.check_teacher(TeacherFingerprint.from_dict(recorded))

    # --- prompts ---------------------------------------------------------------------------------------
    def query_messages(self, messages: Sequence[Message]) -> list[Message]:
        """The conversation as the head renders it, with the query instruction after the last message."""
        conversation = self.model.renderer.messages(list(messages))
        if self.instruction:
            conversation[-1]["content"] = conversation[-1]["content"].rstrip() + "\n\n" + self.instruction
        return conversation

    def assistant_prefix(self) -> str:
        return self.open_marker if self.prefill_open_marker else ""

    def query_prompt(self, messages: Sequence[Message], cache: TurnCache | None = None) -> QueryPrompt:
        """The query prompt: the conversation as `model.encode` tokenizes it (cut after the last message's text),
        then the instruction, the assistant header and the open marker. With a `cache` of the chat's earlier
        turns (`prefill`, a search-first turn) whose text begins the conversation, the prompt continues its ids:
        the whole dialogue, not cut to the head's `max_length`, as the chat holds it."""
        text = self.tokenizer.apply_chat_template(
            self.query_messages(messages), tokenize=False, add_generation_prompt=True
        ) + self.assistant_prefix()
        renderer = self.model.renderer
        head_text, char_start, char_end = renderer.render_text(list(messages))
        if not text.startswith(head_text):  # e.g. a 'plain' head template: no shared prefix to reuse
            return QueryPrompt(self.tokenizer(text, add_special_tokens=False)["input_ids"], None)
        wide = self.model.config.static_span == "conversation" and self.model.head.uses_ids
        if cache is not None and cache.text and cache.ids and head_text.startswith(cache.text) and not wide:
            n = len(cache.text)
            ids, start, end = token_span(self.tokenizer, head_text[n:], char_start - n, char_end - n)
            tail = self.tokenizer(text[len(head_text):], add_special_tokens=False)["input_ids"]
            return QueryPrompt(cache.ids + ids + tail, (len(cache.ids) + start, len(cache.ids) + end))
        rendered = renderer.render(list(messages))
        rest = self.tokenizer(text[len(head_text):], add_special_tokens=False)["input_ids"]
        return QueryPrompt(rendered.input_ids + rest, (rendered.span_start, rendered.span_end), rendered)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the query prompt (see `query_prompt`)."""
        return self.query_prompt(messages).input_ids

    # --- generation with capture -------------------------------------------------------------------------
    def generate_and_search(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        k: int = 5,
        max_new_tokens: int = 32,
        cache: TurnCache | None = None,
        stop_at_close_marker: bool = True,
        **generate_kwargs: Any,
    ) -> AgentResult | list[AgentResult]:
        """Let the LM write a search query, embed it from the states generation computed, search the index.

        `messages` is one conversation (gives one result) or a list of them (batch generation, left-padded;
        gives a list). `cache` (one conversation only) is a `TurnCache` from an earlier result: the longest
        prefix it shares with this prompt is reused. Generation is greedy unless `generate_kwargs` say
        otherwise and stops after the close marker. Raises `EmptyQuerySpanError` when the query has no tokens.
        """
        single = is_conversation(messages)
        conversations = [messages] if single else list(messages)
        if not conversations or not all(is_conversation(c) for c in conversations):
            raise TypeError("messages must be a conversation (list of {'role', 'content'}) or a list of them")
        if cache is not None and not single:
            raise ValueError("cache reuse is supported for one conversation at a time")
        results = self._generate_and_embed([self.query_prompt(c, cache) for c in conversations], max_new_tokens, cache,
                                           stop_at_close_marker, generate_kwargs)
        if self.index is not None:
            start = time.perf_counter()
            queries = torch.stack([r.search_embedding for r in results]).numpy()
            scores, doc_ids = self.index.search(queries, k)
            search_s = (time.perf_counter() - start) / len(results)
            for r, row_scores, row_ids in zip(results, scores, doc_ids, strict=True):
                r.hits = [Hit(d, float(s)) for d, s in zip(row_ids, row_scores, strict=False)]
                r.timings["search_s"] = search_s
        return results[0] if single else results

    def _generate_and_embed(
        self,
        prompts: list[QueryPrompt],
        max_new_tokens: int,
        cache: TurnCache | None,
        stop_at_close_marker: bool,
        generate_kwargs: dict[str, Any],
    ) -> list[AgentResult]:
        tok, device = self.tokenizer, self.model.device
        pad_id = padding_id(tok)
        width = max(len(p.input_ids) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        user_spans: list[tuple[int, int] | None] = []  # in padded positions
        for row, prompt in enumerate(prompts):  # left padding: every row's last prompt token is at one column
            pad = width - len(prompt.input_ids)
            input_ids[row, pad:] = torch.tensor(prompt.input_ids)
            attention_mask[row, pad:] = 1
            user_spans.append((pad + prompt.user_span[0], pad + prompt.user_span[1]) if prompt.user_span else None)
        # the first position whose state is kept: the earliest user turn, else the first generated token
        keep = min([width] + [s[0] for s in user_spans if s is not None])
        kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
        if stop_at_close_marker:
            kwargs.update(stop_strings=[self.close_marker], tokenizer=tok)
        kwargs.update(generate_kwargs)
        kwargs.update(return_dict_in_generate=True)
        cached = 0
        if cache is not None:
            cached = self.reuse_cache(cache, prompts[0].input_ids, keep_new_from=keep)
            if cached:
                kwargs[self.cache_kwarg] = cache.cache
        base = self.model.base_model
        start = time.perf_counter()
        # the calls process positions [cached, ...): the uncached prompt, then the generated tokens
        with torch.inference_mode(), LayerCapture(self.capture_point, keep_from=keep - cached) as capture:
            out = base.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        generated = out.sequences[:, width:].tolist()
        states = capture.states() if capture.chunks else None  # [B, kept positions from `keep`, H]
        available = 0 if states is None else states.shape[1] - (width - keep)
        if available <= 0:
            raise EmptyQuerySpanError("generation stopped after one token; no generated token has a state yet")
        found = [find_query_span(tok, generated[row], available, self.assistant_prefix(), self.open_marker,
                                 self.close_marker, row) for row in range(len(prompts))]
        lo, hi = min(span.start for span, _, _ in found), max(span.end for span, _, _ in found)
        mask = torch.zeros((len(prompts), hi - lo), dtype=torch.long)  # the head reads only the spans' columns
        for row, (span, _, _) in enumerate(found):
            mask[row, span.start - lo : span.end - lo] = 1
        span_s = time.perf_counter() - start
        query_states = states[:, width - keep + lo : width - keep + hi]
        with torch.inference_mode(), head_in_eval(self.model):
            query_ids = out.sequences[:, width + lo : width + hi].to(states.device)
            embeddings = self.model.embed_hidden_states(query_states, mask.to(states.device), query_ids).float().cpu()
        embed_s = time.perf_counter() - start
        user_turn = self._embed_user_turns(states, user_spans, keep, input_ids, prompts)
        user_turn_s = time.perf_counter() - start - embed_s
        new_cache = None
        past = output_cache(out)
        if len(prompts) == 1 and past is not None:
            new_cache = TurnCache(prompts[0].input_ids + generated[0][:available], past)
        results = []
        for row, (span, text, note) in enumerate(found):
            results.append(AgentResult(
                query_text=text[span.char_start : span.char_end],
                query_embedding=embeddings[row],
                hits=[],
                span=span,
                used_markers=span.source == "markers",
                generated_text=text[len(self.assistant_prefix()):],
                generated_ids=_strip_padding(generated[row], pad_id, tok.eos_token_id),
                prompt_ids=prompts[row].input_ids,
                note=note,
                cache=new_cache,
                timings={"generate_s": generate_s / len(prompts), "embed_s": embed_s / len(prompts),
                         "span_s": span_s / len(prompts), "head_s": (embed_s - span_s) / len(prompts),
                         "user_turn_s": user_turn_s / len(prompts), "cached_prompt_tokens": float(cached)},
                assistant_prefix=self.assistant_prefix(),
                user_turn_embedding=user_turn[row],
                searched_with=self.search_with if user_turn[row] is not None else "query",
            ))
        return results

    def _embed_user_turns(self, states: torch.Tensor, spans: list[tuple[int, int] | None],
                          keep: int, input_ids: torch.Tensor,
                          prompts: Sequence[QueryPrompt]) -> list[torch.Tensor | None]:
        """The head over each row's last user message, from the prompt states kept from position `keep`."""
        rows = [row for row, span in enumerate(spans) if span is not None]
        if not rows:
            return [None] * len(spans)
        lo, hi = min(spans[row][0] for row in rows), max(spans[row][1] for row in rows)
        mask = torch.zeros((len(rows), hi - lo), dtype=torch.long, device=states.device)
        for i, row in enumerate(rows):
            mask[i, spans[row][0] - lo : spans[row][1] - lo] = 1
        with torch.inference_mode(), head_in_eval(self.model):
            ids = input_ids[rows, lo:hi].to(states.device)
            static_ids = self.model.static_ids_of([prompts[row].rendered for row in rows])
            embedded = self.model.embed_hidden_states(states[rows, lo - keep : hi - keep], mask, ids,
                                                      static_ids=static_ids).float().cpu()
        out: list[torch.Tensor | None] = [None] * len(spans)
        for i, row in enumerate(rows):
            out[row] = embedded[i]
        return out

    def reuse_cache(self, cache: TurnCache, prompt: list[int], keep_new_from: int | None = None) -> int:
        """Crop `cache` to the longest prefix it shares with `prompt`, and to `keep_new_from` positions at most
        (states from there on must be computed again); at least one prompt token stays new."""
        common = 0
        for a, b in zip(cache.ids, prompt, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1, cache.cache.get_seq_length())
        if keep_new_from is not None:
            common = min(common, keep_new_from)
        if common <= 0:
            return 0
        extra = cache.cache.get_seq_length() - common
        if extra:
            cache.cache.crop(-extra)
        cache.ids = cache.ids[:common]
        return common

    def prefill(self, messages: Sequence[Message]) -> TurnCache:
        """The KV cache of a chat's earlier turns, which a next turn continues (`agent.history.prefill_history`)."""
        return prefill_history(self.model, messages)

    # --- conversation mode (no generation) ---------------------------------------------------------------
    def embed_conversation(
        self, messages: Sequence[Message], return_cache: bool = False, cache: TurnCache | None = None
    ) -> ConversationEmbedding:
        """Embed what the user needs now: the last user turn's span, read in the context of the dialogue.

        One forward of the conversation rendered as `model.encode` renders it (so the embedding equals
        `model.encode(messages)`); with `return_cache`, the KV cache of that prefill comes back so that a
        following `generate` (e.g. the answer) need not recompute it.
        """
        if not is_conversation(messages):
            raise TypeError("messages must be a conversation (a list of {'role': ..., 'content': ...})")
        rendered = self.model.renderer.render(list(messages))
        ids = torch.tensor([rendered.input_ids], device=self.model.device)
        kwargs: dict[str, Any] = {"use_cache": return_cache or cache is not None, **cache_only(self.model.base_model)}
        cached = 0
        if cache is not None:  # the span's states are computed again, so the cache is cut before it at most
            cached = self.reuse_cache(cache, rendered.input_ids, keep_new_from=rendered.span_start)
            if cached:
                kwargs[self.cache_kwarg] = cache.cache
        capture = LayerCapture(self.capture_point, keep_from=rendered.span_start - cached)
        with torch.inference_mode(), capture:
            out = self.model.base_model(input_ids=ids[:, cached:], attention_mask=torch.ones_like(ids), **kwargs)
        states = capture.states()  # the span's states only
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        with torch.inference_mode(), head_in_eval(self.model):
            span_ids = ids[:, rendered.span_start : rendered.span_start + states.shape[1]].to(states.device)
            static_ids = self.model.static_ids_of([rendered])
            embedding = self.model.embed_hidden_states(states, mask, span_ids, static_ids=static_ids)[0].float().cpu()
        past = output_cache(out)
        turn_cache = TurnCache(list(rendered.input_ids), past) if (return_cache and past is not None) else None
        return ConversationEmbedding(embedding, list(rendered.input_ids), rendered.span_start, rendered.span_end,
                                     turn_cache)

    def search(self, embeddings: torch.Tensor | np.ndarray, k: int = 5) -> list[list[Hit]]:
        """Top-k hits per embedding (a 1-D embedding is one query)."""
        if self.index is None:
            raise ValueError("this NativeRetriever has no index")
        scores, doc_ids = self.index.search(embeddings, k)
        return [[Hit(d, float(s)) for d, s in zip(ids, row, strict=False)] for ids, row in zip(doc_ids, scores,
                                                                                                strict=True)]

    # --- answering with retrieved passages ---------------------------------------------------------------
    def answer_messages(
        self, messages: Sequence[Message], result: AgentResult, passages: Sequence[str]
    ) -> list[Message]:
        """The conversation continued by the query turn and a user turn holding the passages.

        Its rendering starts with the query prompt + the generated query, so `result.cache` is reused.
        """
        context = "\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages)) or "(no results)"
        return [
            *self.query_messages(messages),
            {"role": "assistant", "content": result.assistant_text.strip()},
            {"role": "user", "content": f"Search results:\n{context}\n\nAnswer my last question using them, briefly."},
        ]

    def answer(
        self,
        messages: Sequence[Message],
        result: AgentResult,
        passages: Sequence[str],
        max_new_tokens: int = 96,
        **generate_kwargs: Any,
    ) -> tuple[str, TurnCache | None]:
        """Generate the answer from the retrieved passages, reusing the query turn's KV cache."""
        text = self.tokenizer.apply_chat_template(
            self.answer_messages(messages, result, passages), tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id, **generate_kwargs,
                                  "return_dict_in_generate": True}
        cache = result.cache
        if cache is not None and self.reuse_cache(cache, ids):
            kwargs[self.cache_kwarg] = cache.cache
        input_ids = torch.tensor([ids], device=self.model.device)
        with torch.inference_mode():
            out = self.model.base_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                 **kwargs)
        new = out.sequences[0, len(ids):].tolist()
        past = output_cache(out)
        reply = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return reply, (TurnCache(ids + new[:-1], past) if past is not None else None)


@contextlib.contextmanager
def head_in_eval(model: RetrievalModel) -> Iterator[None]:
    """Embed with the head in eval mode (no dropout), then restore the mode the caller had set."""
    was_training = model.head.training
    model.head.eval()
    try:
        yield
    finally:
        model.head.train(was_training)


def _strip_padding(ids: list[int], pad_id: int | None, eos_id: int | None) -> list[int]:
    """Generated ids up to and including the first end-of-sequence token (batch rows are padded after it)."""
    for i, t in enumerate(ids):
        if t == eos_id:
            return ids[: i + 1]
    return ids
