"""The whole agent turn, search first: one prefill, the head, the index, and the answer from the same KV cache.

`SearchFirstAgent.turn(messages)`:
1. one forward of the conversation as the head renders it (cut after the last user message's text); a hook
   keeps the head's layer over that message only;
2. the head embeds the message from those states (what `model.encode(messages)` computes, when the
   conversation fits the head's `max_length`), the index is searched;
3. the passages are appended to the last user message and the answer is generated continuing the prefill's
   KV cache: no token of the dialogue runs twice, and the LM writes no search query. With a `PassageCache`
   the passages' keys and values come from it (computed once per passage, see its module), so the turn computes
   what plain answering without retrieval would.
Across turns, `turn(result.history + [next user message], cache=result.cache)` reuses every token already
computed (the cache's text is checked to be a prefix of the new prompt; otherwise it is recomputed). A first turn
starts from the chat template's fixed prefix (system prompt and user marker), computed once when the agent is built.
`turns(conversations)` prefills a batch at once (left-padded), then answers each row from its own cache.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from retrieval_head.agent.capture import LayerCapture
from retrieval_head.agent.history import template_prefix
from retrieval_head.agent.passage_cache import PASSAGE_FORMAT, PassageCache
from retrieval_head.agent.results import Hit, TurnCache
from retrieval_head.agent.retriever import NativeRetriever, head_in_eval
from retrieval_head.agent.span import token_span
from retrieval_head.core.kv_cache import cache_only, output_cache
from retrieval_head.core.templates import Message, RenderedInput, context_length, is_conversation, padding_id

DEFAULT_RESULTS = "{passages}"
"""What follows the user's question in the answer prompt ({passages}: the passages, each in `passage_format`)."""


@dataclass
class RagTurn:
    """One search-first turn: the answer, what it was given, and what the turn cost."""

    answer: str
    hits: list[Hit]
    passages: list[str]
    embedding: torch.Tensor
    history: list[Message]
    """The conversation as the LM read it (passages in the last user message) + the answer: the next turn's
    start (`history + [next user message]`, with `cache`)."""
    cache: TurnCache | None
    timings: dict[str, float] = field(default_factory=dict)
    """prefill_s, embed_s, search_s, first_token_s (from the turn's start), answer_s, total_s."""
    tokens: dict[str, int] = field(default_factory=dict)
    """dialogue (computed), reused (from the cache, or the template's prefix on a first turn), passages (+ answer
    prompt, computed), passages_reused (from a passage cache), passages_first_seen (of those, the tokens the cache
    computed in this turn, in forwards of up to 8 passages: passages no earlier turn cited), answer; computed =
    dialogue + passages + answer - 1 when no passage was first seen; forward_passes: calls of the base model during
    the turn."""
    cut_tokens: int = 0
    """Dialogue tokens dropped from the left to fit the LM's context (0: the whole conversation was read)."""

    @property
    def doc_ids(self) -> list[str]:
        return [h.doc_id for h in self.hits]


class SearchFirstAgent:
    """An agent that searches before it answers, from the one prefill its answer needs anyway.

    Args:
        retriever: a `NativeRetriever` with an index (checked against the head's teacher).
        documents: doc id -> text, for the passages (the texts the index was built from).
        k: passages per turn. Larger than the index: all of it.
        passage_chars: each passage is cut to this many characters.
        results_template: appended to the last user message; `{passages}` is filled in.
        passage_format: how each passage is written ('{passage}': its text); the passage cache's, when given.
        passage_cache: reuse each passage's keys and values across turns (`PassageCache(model)`); then
            `results_template` must start with '{passages}' (the passages directly follow the question).
        reuse_prefix: compute the chat template's fixed prefix (the system prompt up to the first user message's
            text) once, here, and start every single turn without a cache from it (exact: the prefix reads nothing
            after it; recomputed when the model moves to another device or dtype, not when its weights change: build
            a new agent after switching adapters). Batches (`turns`) compute it per row; caches other than plain
            key/value layers (sliding-window, linear-attention) never reuse it.
    """

    def __init__(self, retriever: NativeRetriever, documents: Mapping[str, str], k: int = 3,
                 passage_chars: int = 600, results_template: str = DEFAULT_RESULTS,
                 passage_format: str = PASSAGE_FORMAT, passage_cache: PassageCache | None = None,
                 reuse_prefix: bool = True) -> None:
        if retriever.index is None:
            raise ValueError("SearchFirstAgent needs a NativeRetriever with an index (NativeRetriever(model, index))")
        if retriever.model.config.query_template != "chat":
            raise ValueError("search-first reuses the head's rendering as the answer prompt's prefix, so the head "
                             "must use query_template='chat'")
        if "{passages}" not in results_template:
            raise ValueError("results_template must contain '{passages}'")
        if "{passage}" not in passage_format:
            raise ValueError("passage_format must contain '{passage}'")
        if passage_cache is not None:
            if passage_cache.model is not retriever.model:
                raise ValueError("the passage_cache was built for another model; build it with PassageCache(model) "
                                 "for this retriever's model")
            if not results_template.startswith("{passages}"):
                raise ValueError("with a passage_cache the passages must directly follow the question: "
                                 "results_template must start with '{passages}'")
            if passage_format not in (PASSAGE_FORMAT, passage_cache.passage_format):
                raise ValueError(f"passage_format {passage_format!r} differs from the passage_cache's "
                                 f"{passage_cache.passage_format!r}: give it to PassageCache(model, passage_format=)")
            passage_format = passage_cache.passage_format
        self.passage_format, self.passage_cache = passage_format, passage_cache
        self.retriever, self.documents = retriever, documents
        self.model, self.tokenizer = retriever.model, retriever.tokenizer
        self.k = check_k(k)
        self.passage_chars, self.results_template = passage_chars, results_template
        self.context = context_length(self.retriever.model.base_model) or 1 << 30
        self.prefix = self._template_prefix() if reuse_prefix else None
        """The KV cache of the chat template's fixed prefix, the start of every first turn (None: not reused)."""

    # --- one conversation ------------------------------------------------------------------------------
    def turn(self, messages: Sequence[Message], k: int | None = None, max_new_tokens: int = 96,
             cache: TurnCache | None = None, **generate_kwargs: Any) -> RagTurn:
        """Search with the last user message read in context, then answer from the same prefill."""
        started = time.perf_counter()
        prompt = self._prompt(messages, max_new_tokens, cache, k)
        if cache is None and self.prefix is not None and not prompt.cut:
            cache = self._first_turn_cache()
        with count_forwards(self.model.base_model) as calls:
            reused = 0
            if cache is not None and not prompt.cut:
                reused = self.retriever.reuse_cache(cache, prompt.ids, keep_new_from=prompt.span[0])
            past = cache.cache if reused else None
            embedding, past, embed_s = self._prefill([prompt], [reused], past)
            prefill_s = time.perf_counter() - started
            hits, search_s = self._search(embedding, k)
            result = self._answer(messages, prompt, hits[0], past, max_new_tokens, started, generate_kwargs)
        result.embedding = embedding[0]
        result.timings.update(prefill_s=prefill_s, embed_s=embed_s, search_s=search_s,
                              total_s=time.perf_counter() - started)
        result.tokens.update(dialogue=len(prompt.ids) - reused, reused=reused, forward_passes=calls.count,
                             computed=calls.tokens)
        return result

    def prepare_passages(self, doc_ids: Sequence[str] | None = None, batch_size: int = 8,
                         show_progress_bar: bool = False) -> None:
        """Compute the passage cache for these documents (default: all), as the answers will cite them (cut to
        `passage_chars`): at index time, so that no turn computes a passage."""
        if self.passage_cache is None:
            raise ValueError("prepare_passages needs a passage_cache (SearchFirstAgent(..., passage_cache="
                             "PassageCache(model)))")
        passages = list(dict.fromkeys(self.passage(d) for d in (self.documents if doc_ids is None else doc_ids)))
        limit = self.passage_cache.max_passages
        if limit is not None and len(passages) > limit:
            raise ValueError(f"{len(passages)} passages do not fit the passage cache's max_passages={limit}: most "
                             "would be dropped again; raise max_passages (None keeps all) or prepare the cited ones")
        self.passage_cache.build(passages, batch_size, show_progress_bar)

    def passage(self, doc_id: str) -> str:
        """The document as the answers cite it: cut to `passage_chars`, without the whitespace a cut may end on
        (chat templates that trim messages would otherwise render it differently)."""
        return self.documents[doc_id][: self.passage_chars].strip()

    # --- a batch of conversations ----------------------------------------------------------------------
    def turns(self, conversations: Sequence[Sequence[Message]], k: int | None = None, max_new_tokens: int = 96,
              **generate_kwargs: Any) -> list[RagTurn]:
        """`turn` for several conversations: one left-padded prefill and one search for all, then each answer
        continues its own row of the prefill cache (its padding dropped)."""
        if not conversations:
            raise ValueError("turns() needs at least one conversation")
        started = time.perf_counter()
        prompts = [self._prompt(m, max_new_tokens, None, k) for m in conversations]
        with count_forwards(self.model.base_model) as calls:
            embeddings, past, embed_s = self._prefill(prompts, [0] * len(prompts), None)
            prefill_s = time.perf_counter() - started
            hits, search_s = self._search(embeddings, k)
            width = max(len(p.ids) for p in prompts)
            results = []
            for row, (messages, prompt) in enumerate(zip(conversations, prompts, strict=True)):
                row_past = row_cache(past, row, width - len(prompt.ids))
                results.append(self._answer(messages, prompt, hits[row], row_past, max_new_tokens, started,
                                            generate_kwargs))
        for row, (result, prompt) in enumerate(zip(results, prompts, strict=True)):
            result.embedding = embeddings[row]
            result.timings.update(prefill_s=prefill_s, search_s=search_s, embed_s=embed_s)
            result.tokens.update(dialogue=len(prompt.ids), reused=0)
        for result in results:  # the batch's totals, shared
            result.timings["total_s"] = time.perf_counter() - started
            result.tokens.update(forward_passes=calls.count, computed=calls.tokens)
        return results

    # --- the steps ----------------------------------------------------------------------------------------
    def _template_prefix(self) -> TurnCache | None:
        """The KV cache of what the head's chat rendering writes before any conversation's first user message;
        None when there is none or the cache's layers are not plain keys and values (copied and cropped safely)."""
        from transformers.cache_utils import DynamicLayer

        text, ids = template_prefix(self.model)
        if not ids:
            return None
        input_ids = torch.tensor([ids], device=self.model.device)
        with torch.inference_mode():
            out = self.model.base_model(input_ids=input_ids, use_cache=True, **cache_only(self.model.base_model))
        past = output_cache(out)
        if past is None or not all(type(layer) is DynamicLayer for layer in getattr(past, "layers", [None])):
            return None
        return TurnCache(ids, past, text=text)

    def _first_turn_cache(self) -> TurnCache | None:
        """A copy of the template prefix's cache (computed again if the model moved to another device or dtype)."""
        keys = self.prefix.cache.layers[0].keys
        weight = next(self.model.base_model.parameters())
        if (keys.device, keys.dtype) != (weight.device, weight.dtype):
            self.prefix = self._template_prefix()
        if self.prefix is None:
            return None
        return TurnCache(list(self.prefix.ids), row_cache(self.prefix.cache, 0, 0))

    def _prompt(self, messages: Sequence[Message], max_new_tokens: int, cache: TurnCache | None,
                k: int | None) -> _Prompt:
        if not is_conversation(messages):
            raise ValueError("a turn needs a non-empty conversation (a list of {'role': ..., 'content': ...})")
        if messages[-1]["role"] != "user":
            raise ValueError(f"the last message must be the user's (it is {messages[-1]['role']!r}): the agent "
                             "searches for what the user asked last")
        text, char_start, char_end = self.model.renderer.render_text(list(messages))
        tokenizer = self.tokenizer
        if cache is not None and cache.text is not None and text.startswith(cache.text) and cache.ids:
            rest = text[len(cache.text):]
            ids, start, end = token_span(tokenizer, rest, char_start - len(cache.text), char_end - len(cache.text))
            ids, start, end = cache.ids + ids, start + len(cache.ids), end + len(cache.ids)
        else:
            ids, start, end = token_span(tokenizer, text, char_start, char_end)
        k = min(check_k(self.k if k is None else k), len(self.retriever.index))
        room = self.context - max_new_tokens - self._passage_budget(k)
        cut = max(0, len(ids) - room)
        if cut > start:
            raise ValueError(f"the last user message ({end - start} tokens) does not fit the LM's context of "
                             f"{self.context} with {max_new_tokens} answer tokens and the passages; shorten it")
        wide = self.model.config.static_span == "conversation" and self.model.head.uses_ids
        rendered = self.model.renderer.render(list(messages)) if wide else None
        return _Prompt(ids[cut:], (start - cut, end - cut), text, cut, rendered)

    def _passage_budget(self, k: int) -> int:
        """Tokens kept free for the passages: a token holds at least one character, + numbering and template."""
        template = self.results_template.format(passages="") + "<|im_end|>\n<|im_start|>assistant\n"
        return k * (self.passage_chars + 8) + len(self.tokenizer(template, add_special_tokens=False)["input_ids"])

    def _prefill(self, prompts: list[_Prompt], reused: list[int], past: Any) -> tuple[torch.Tensor, Any, float]:
        """One forward over the prompts (left-padded), keeping the head's layer over each span: (embeddings, the
        KV cache, seconds the head took)."""
        width = max(len(p.ids) for p in prompts)
        pad_id = padding_id(self.tokenizer)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p.ids):] = torch.tensor(p.ids)
            mask[row, width - len(p.ids):] = 1
        spans = [(width - len(p.ids) + p.span[0], width - len(p.ids) + p.span[1]) for p in prompts]
        cached = reused[0] if len(prompts) == 1 else 0
        keep = min(s[0] for s in spans)
        device = self.model.device
        kwargs: dict[str, Any] = {"use_cache": True, "attention_mask": mask.to(device),
                                  **cache_only(self.model.base_model)}
        if len(prompts) > 1:  # left padding: each row's positions count from its first token
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        if past is not None:
            kwargs[self.retriever.cache_kwarg] = past
        capture = LayerCapture(self.retriever.capture_point, keep_from=keep - cached)
        with torch.inference_mode(), capture:
            out = self.model.base_model(input_ids=input_ids[:, cached:].to(device), **kwargs)
        started = time.perf_counter()
        states = capture.states()  # [B, width - keep, H]
        span_mask = torch.zeros(states.shape[:2], dtype=torch.long, device=states.device)
        for row, (a, b) in enumerate(spans):
            span_mask[row, a - keep : b - keep] = 1
        with torch.inference_mode(), head_in_eval(self.model):
            ids = input_ids[:, keep:].to(states.device)
            static_ids = self.model.static_ids_of([p.rendered for p in prompts]) if prompts[0].rendered else None
            embeddings = self.model.embed_hidden_states(states, span_mask, ids, static_ids=static_ids).float().cpu()
        return embeddings, output_cache(out), time.perf_counter() - started

    def _search(self, embeddings: torch.Tensor, k: int | None) -> tuple[list[list[Hit]], float]:
        k = min(check_k(self.k if k is None else k), len(self.retriever.index))
        started = time.perf_counter()
        hits = self.retriever.search(embeddings, k)
        return hits, time.perf_counter() - started

    def _answer(self, messages: Sequence[Message], prompt: _Prompt, hits: list[Hit], past: Any, max_new_tokens: int,
                started: float, generate_kwargs: dict[str, Any]) -> RagTurn:
        passages = [self.passage(h.doc_id) for h in hits]
        written = "".join(self.passage_format.format(passage=p) for p in passages)
        history = [dict(m) for m in messages]
        history[-1]["content"] += self.results_template.format(passages=written)
        full = self.tokenizer.apply_chat_template(self.model.renderer.messages(history), tokenize=False,
                                                  add_generation_prompt=True)
        if not full.startswith(prompt.text + (written if self.passage_cache is not None else "")):
            raise ValueError("the chat template renders the conversation differently once the passages follow the "
                             "last message; this template cannot continue the prefill (use NativeRetriever.answer)")
        tail = full[len(prompt.text):]
        reused_ids: list[int] = []
        computed_before = self.passage_cache.computed_tokens if self.passage_cache is not None else 0
        if self.passage_cache is not None and passages:  # the passages' keys and values join the prefill's cache
            reused_ids = self.passage_cache.extend(past, self.passage_cache.states(passages), len(prompt.ids))
            tail = tail[len(written):]
        first_seen = self.passage_cache.computed_tokens - computed_before if self.passage_cache is not None else 0
        computed_ids = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
        tail_ids = reused_ids + computed_ids
        ids = prompt.ids + tail_ids
        if len(ids) + max_new_tokens > self.context:
            raise ValueError(f"the prompt with its passages ({len(ids)} tokens) and {max_new_tokens} answer tokens "
                             f"exceeds the LM's context of {self.context}; lower k or passage_chars")
        clock = FirstToken(started)
        kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id, **generate_kwargs,
                                  "return_dict_in_generate": True, "streamer": clock}
        if past is not None:
            kwargs[self.retriever.cache_kwarg] = past
        input_ids = torch.tensor([ids], device=self.model.device)
        answer_started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.base_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                 **kwargs)
        answer_s = time.perf_counter() - answer_started
        new = out.sequences[0, len(ids):].tolist()
        eos = self.tokenizer.eos_token_id
        body = new[:-1] if new and new[-1] == eos else new
        raw = self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        history.append({"role": "assistant", "content": raw})
        cache_out = output_cache(out)
        next_cache = None
        if cache_out is not None and new:
            covered = ids + new[:-1]  # the last token's keys are not computed yet
            text = full + self.tokenizer.decode(new[:-1], skip_special_tokens=False,
                                                              clean_up_tokenization_spaces=False)
            next_cache = TurnCache(covered, cache_out, text=None if prompt.cut else text)
        return RagTurn(
            answer=self.tokenizer.decode(body, skip_special_tokens=True).strip(), hits=hits, passages=passages,
            embedding=torch.empty(0), history=history, cache=next_cache,
            timings={"first_token_s": (clock.first or time.perf_counter()) - started, "answer_s": answer_s},
            tokens={"passages": len(computed_ids), "passages_reused": len(reused_ids),
                    "passages_first_seen": first_seen, "answer": len(new)},
            cut_tokens=prompt.cut,
        )


@dataclass
class _Prompt:
    ids: list[int]
    span: tuple[int, int]
    text: str
    cut: int
    rendered: RenderedInput | None = None  # as `model.encode` renders it, for a conversation-wide static branch


def check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive number of passages, got {k!r}")
    return k


def row_cache(cache: Any, row: int, start: int) -> Any:
    """One row of a batched KV cache, from position `start` (its left padding dropped)."""
    single = copy.copy(cache)
    single.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in single.layers:
        layer.keys = layer.keys[row : row + 1, :, start:].clone()
        layer.values = layer.values[row : row + 1, :, start:].clone()
    return single


class FirstToken:
    """A `generate` streamer that notes when the first new token arrives (the first `put` is the prompt)."""

    def __init__(self, started: float) -> None:
        self.started, self.first, self._puts = started, None, 0

    def put(self, value: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        """Nothing to flush."""


@dataclass
class ForwardCount:
    count: int = 0
    tokens: int = 0


@contextmanager
def count_forwards(model: torch.nn.Module) -> Iterator[ForwardCount]:
    """Count the model's forward calls and the tokens they compute (positions fed, padding included)."""
    counter = ForwardCount()

    def hook(module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        counter.count += 1
        counter.tokens += int(ids.shape[0] * ids.shape[1]) if ids is not None else 0

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


__all__ = ["DEFAULT_RESULTS", "RagTurn", "SearchFirstAgent", "count_forwards", "token_span"]
