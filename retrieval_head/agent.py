"""The agent hook: the LM writes its own search query and the head embeds it from generation's own states.

`NativeRetriever(model, index)` asks the LM (in a system message) to write a search query between markers,
captures the head's layer while `generate()` runs, finds the query's tokens among the generated ones, pools
and projects them with the head, and searches the index. No second model runs and the LM makes no extra pass:
the hidden state of each generated token is computed anyway when that token is fed back to the model.

Capture mechanism: a forward hook on the one module whose output *is* `hidden_states[model.layer_index]`
(the input of decoder block `i`, or the final norm for the last index), found once by a probe. The other way,
`generate(output_hidden_states=True, return_dict_in_generate=True)`, makes every layer keep its states for
every step ((L + 1) tensors per step, 31 for SmolLM2) only to read one of them; the hook keeps one [B, T, H]
reference per generated step and nothing else. Measured (benchmarks/results/agent_turn.md, SmolLM2-135M, CPU,
24 new tokens): both run within the noise of plain `generate` (the LM's matmuls dominate; the hook body is
~2.5 µs a step), but the hook keeps 0.05 MiB of states vs 14.1 MiB, and it leaves `generate()`'s arguments
and outputs untouched (any decoding mode and caller kwargs compose with it). Hence the hook.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .encode_adapter import EncodeAdapterError, has_encode_adapter
from .fingerprint import TeacherFingerprint, TeacherMismatchError
from .model import RetrievalModel, base_of
from .templates import Message, is_conversation

logger = logging.getLogger(__name__)

DEFAULT_OPEN = "<query>"
DEFAULT_CLOSE = "</query>"
DEFAULT_INSTRUCTION = (
    "You can search a document collection. Before you answer, write one short search query for what the user "
    "needs now, naming the entity the conversation is about, between {open} and {close}. Example: if the user "
    "asks when the Louvre opens on Sundays, write {open}Louvre opening hours on Sunday{close}"
)  # an example from another domain: SmolLM2-135M copied an in-domain example verbatim
SpanSource = Literal["markers", "open_marker", "whole_turn"]


class EmptyQuerySpanError(ValueError):
    """The query the LM wrote has no tokens (e.g. `<query></query>`): there is nothing to embed."""


# --- where the head's layer lives ----------------------------------------------------------------------


@dataclass(frozen=True)
class CapturePoint:
    """The module whose input (`pre`) or output (`out`) equals `hidden_states[layer_index]`."""

    module: nn.Module
    where: Literal["pre", "out"]
    name: str


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return getattr(value, "last_hidden_state", None)


def _decoder_layers(base: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    lists = [(n, m) for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not lists:
        raise ValueError(f"found no list of {num_layers} decoder blocks in {type(base).__name__}")
    return lists[0]


def find_capture_point(model: RetrievalModel) -> CapturePoint:
    """Find, with one probe forward, the module that carries the head's layer (works for any causal LM).

    Candidates in order: the input of block `layer_index`, the output of block `layer_index - 1`, then the
    output of every module of the base, innermost last-first (the final norm for the last layer). The first
    one whose tensor equals
    `output_hidden_states[layer_index]` on the probe is used.
    """
    base = base_of(model.base_model)
    num_layers = model.config.base_num_layers
    index = model.layer_index
    list_name, layers = _decoder_layers(base, num_layers)
    candidates: list[tuple[nn.Module, str, str]] = []
    if index < num_layers:
        candidates.append((layers[index], "pre", f"{list_name}.{index}"))
    if index >= 1:
        candidates.append((layers[index - 1], "out", f"{list_name}.{index - 1}"))
    # Innermost modules last-first: for the last layer this finds the final norm before its parent decoder.
    for name, module in reversed(list(base.named_modules())):
        if module is not base and "lm_head" not in name and not isinstance(module, nn.ModuleList):
            candidates.append((module, "out", name))
    seen: dict[int, torch.Tensor | None] = {}
    handles = []
    for i, (module, where, _) in enumerate(candidates):
        if where == "pre":
            def hook(mod, args, kwargs, i=i):
                seen[i] = _first_tensor(args) if args else kwargs.get("hidden_states")
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            def hook(mod, args, output, i=i):
                seen.setdefault(i, _first_tensor(output))
            handles.append(module.register_forward_hook(hook))
    ids = torch.tensor([[1, 2, 3, 4]], device=model.device) % max(int(base.config.get_text_config().vocab_size), 5)
    try:
        with torch.inference_mode():
            reference = base(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                             use_cache=False).hidden_states[index]
    finally:
        for handle in handles:
            handle.remove()
    for i, (module, where, name) in enumerate(candidates):
        got = seen.get(i)
        if got is not None and got.shape == reference.shape and torch.allclose(got, reference, atol=1e-6):
            return CapturePoint(module, where, name)
    raise ValueError(
        f"no module of {type(base).__name__} outputs hidden_states[{index}]; capture during generation is not "
        "supported for this architecture (embed the generated text with model.encode instead)."
    )


class LayerCapture:
    """Context manager keeping the head's layer states of the forward calls made while it is active.

    `keep_from` drops positions before it (counted over all calls): generation keeps only the states of the
    generated tokens, not the prompt's.
    """

    def __init__(self, point: CapturePoint, keep_from: int = 0) -> None:
        self.point = point
        self.keep_from = keep_from
        self.chunks: list[torch.Tensor] = []
        self.seen = 0
        self._handle: Any = None

    def _keep(self, states: torch.Tensor) -> None:
        start, self.seen = self.seen, self.seen + states.shape[1]
        if self.seen > self.keep_from:
            self.chunks.append(states[:, max(0, self.keep_from - start):].detach())

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._keep(_first_tensor(args) if args else kwargs["hidden_states"])

    def _out(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._keep(_first_tensor(output))

    def __enter__(self) -> LayerCapture:
        self.chunks, self.seen = [], 0
        if self.point.where == "pre":
            self._handle = self.point.module.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            self._handle = self.point.module.register_forward_hook(self._out)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def states(self) -> torch.Tensor:
        """Kept states, [B, T_kept, H] (calls joined on time; position `keep_from` first)."""
        if not self.chunks:
            raise RuntimeError("no forward call was captured past position keep_from")
        return self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks, dim=1)


# --- results -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float


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


@dataclass
class TurnCache:
    """A KV cache and the token ids it covers, to reuse across calls (the longest common prefix is kept)."""

    ids: list[int]
    cache: Any


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

    @property
    def doc_ids(self) -> list[str]:
        return [h.doc_id for h in self.hits]

    @property
    def scores(self) -> list[float]:
        return [h.score for h in self.hits]

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


# --- the retriever -------------------------------------------------------------------------------------


def _token_char_offsets(tokenizer: Any, ids: Sequence[int], prefix: str = "") -> tuple[str, list[tuple[int, int]]]:
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


def _cache_kwarg(model: nn.Module) -> str:
    """`cache` (transformers >= 5.x) or `past_key_values` (older), whichever `generate` accepts by name."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class NativeRetriever:
    """An agent LM (a `RetrievalModel`) that searches `index` with queries embedded from its own states.

    Args:
        model: the LM + head. Its tokenizer must have a chat template (the prompt is a chat).
        index: a `DocumentIndex` built by the head's teacher (checked), or None to only embed.
        open_marker / close_marker: what the query is written between.
        instruction: system message asking for the query (`{open}`/`{close}` are filled in); it is appended
            to the conversation's own system message when there is one.
        prefill_open_marker: start the assistant turn with `open_marker` so the LM writes the query at once.
        check_teacher: refuse an index whose teacher fingerprint differs from `model.config.teacher`.

    A model with an encode adapter (`retrieval_head.encode_adapter`) is refused with `EncodeAdapterError`:
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
    ) -> None:
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
        if index is not None:
            self._check_index(index, check_teacher)
        self.capture_point = find_capture_point(model)
        self._cache_kwarg = _cache_kwarg(base_of(model.base_model))

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
        """The conversation with the query instruction in its system message."""
        conversation = [dict(m) for m in messages]
        if not self.instruction:
            return conversation
        if conversation and conversation[0]["role"] == "system":
            conversation[0]["content"] = conversation[0]["content"].rstrip() + "\n\n" + self.instruction
        else:
            conversation.insert(0, {"role": "system", "content": self.instruction})
        return conversation

    def assistant_prefix(self) -> str:
        return self.open_marker if self.prefill_open_marker else ""

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the query prompt: instruction + conversation + assistant header (+ open marker)."""
        text = self.tokenizer.apply_chat_template(
            self.query_messages(messages), tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text + self.assistant_prefix(), add_special_tokens=False)["input_ids"]

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
        results = self._generate_and_embed([self.prompt_ids(c) for c in conversations], max_new_tokens, cache,
                                           stop_at_close_marker, generate_kwargs)
        if self.index is not None:
            start = time.perf_counter()
            scores, doc_ids = self.index.search(torch.stack([r.query_embedding for r in results]).numpy(), k)
            search_s = (time.perf_counter() - start) / len(results)
            for r, row_scores, row_ids in zip(results, scores, doc_ids, strict=True):
                r.hits = [Hit(d, float(s)) for d, s in zip(row_ids, row_scores, strict=False)]
                r.timings["search_s"] = search_s
        return results[0] if single else results

    def _generate_and_embed(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        cache: TurnCache | None,
        stop_at_close_marker: bool,
        generate_kwargs: dict[str, Any],
    ) -> list[AgentResult]:
        tok, device = self.tokenizer, self.model.device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding: every row's last prompt token is at the same column
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        kwargs: dict[str, Any] = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": pad_id}
        if stop_at_close_marker:
            kwargs.update(stop_strings=[self.close_marker], tokenizer=tok)
        kwargs.update(generate_kwargs)
        kwargs.update(return_dict_in_generate=True)
        cached = 0
        if cache is not None:
            cached = self._reuse(cache, prompts[0])
            if cached:
                kwargs[self._cache_kwarg] = cache.cache
        base = self.model.base_model
        start = time.perf_counter()
        # the calls process positions [cached, ...): the uncached prompt, then generated tokens; keep the latter
        with torch.inference_mode(), LayerCapture(self.capture_point, keep_from=width - cached) as capture:
            out = base.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        generated = out.sequences[:, width:].tolist()
        if not capture.chunks:
            raise EmptyQuerySpanError("generation stopped after one token; no generated token has a state yet")
        states = capture.states()  # [B, generated tokens whose state was computed, H]
        available = states.shape[1]
        spans, texts, notes = [], [], []
        for row in range(len(prompts)):
            span, text, note = self._find_span(generated[row], available, row)
            spans.append(span)
            texts.append(text)
            notes.append(note)
        mask = torch.zeros((len(prompts), available), dtype=torch.long)
        for row, span in enumerate(spans):
            mask[row, span.start : span.end] = 1
        span_s = time.perf_counter() - start
        with torch.inference_mode(), _head_in_eval(self.model):
            embeddings = self.model.embed_hidden_states(states, mask.to(states.device)).float().cpu()
        embed_s = time.perf_counter() - start
        new_cache = None
        past = _output_cache(out)
        if len(prompts) == 1 and past is not None:
            new_cache = TurnCache(prompts[0] + generated[0][:available], past)
        results = []
        for row, span in enumerate(spans):
            text = texts[row]
            results.append(AgentResult(
                query_text=text[span.char_start : span.char_end],
                query_embedding=embeddings[row],
                hits=[],
                span=span,
                used_markers=span.source == "markers",
                generated_text=text[len(self.assistant_prefix()):],
                generated_ids=_strip_padding(generated[row], pad_id, tok.eos_token_id),
                prompt_ids=prompts[row],
                note=notes[row],
                cache=new_cache,
                timings={"generate_s": generate_s / len(prompts), "embed_s": embed_s / len(prompts),
                         "span_s": span_s / len(prompts), "head_s": (embed_s - span_s) / len(prompts),
                         "cached_prompt_tokens": float(cached)},
                assistant_prefix=self.assistant_prefix(),
            ))
        return results

    def _reuse(self, cache: TurnCache, prompt: list[int]) -> int:
        """Crop `cache` to the longest prefix it shares with `prompt` (at least one prompt token stays new)."""
        common = 0
        for a, b in zip(cache.ids, prompt, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1, cache.cache.get_seq_length())
        if common <= 0:
            return 0
        extra = cache.cache.get_seq_length() - common
        if extra:
            cache.cache.crop(-extra)
        cache.ids = cache.ids[:common]
        return common

    def _find_span(self, generated: list[int], available: int, row: int) -> tuple[QuerySpan, str, str | None]:
        """The query's generated-token span (markers, else the whole turn), its text and a fallback note."""
        tok = self.tokenizer
        prefix = self.assistant_prefix()
        special = set(tok.all_special_ids)
        end_of_turn = len(generated)
        for i, t in enumerate(generated):
            if t in special:
                end_of_turn = i
                break
        text, offsets = _token_char_offsets(tok, generated[:end_of_turn], prefix)
        text = prefix + text
        note = None
        open_at = text.find(self.open_marker)
        if open_at >= 0:
            content_start = open_at + len(self.open_marker)
            close_at = text.find(self.close_marker, content_start)
            if close_at >= 0:
                source: SpanSource = "markers"
                char_start, char_end = content_start, close_at
            else:
                source = "open_marker"
                char_start, char_end = content_start, len(text)
                note = (f"the LM did not close the query with {self.close_marker!r}; the query runs from "
                        f"{self.open_marker!r} to the end of the generated text")
        else:
            source = "whole_turn"
            char_start, char_end = len(prefix), len(text)
            note = f"the LM wrote no {self.open_marker!r} marker; the whole generated turn is the query"
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
        span = QuerySpan(start, end, char_start, char_end, source, dropped)
        return span, text, note

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
        kwargs: dict[str, Any] = {"use_cache": return_cache or cache is not None}
        cached = 0
        if cache is not None:
            cached = self._reuse(cache, rendered.input_ids)
            if cached:
                kwargs[self._cache_kwarg] = cache.cache
        if rendered.span_start < cached:  # _reuse keeps at least the last token new; the span may be longer
            extra = cache.cache.get_seq_length() - rendered.span_start
            cache.cache.crop(-extra)
            cache.ids = cache.ids[: rendered.span_start]
            cached = rendered.span_start
        capture = LayerCapture(self.capture_point, keep_from=rendered.span_start - cached)
        with torch.inference_mode(), capture:
            out = self.model.base_model(input_ids=ids[:, cached:], attention_mask=torch.ones_like(ids), **kwargs)
        states = capture.states()  # the span's states only
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        with torch.inference_mode(), _head_in_eval(self.model):
            embedding = self.model.embed_hidden_states(states, mask)[0].float().cpu()
        past = _output_cache(out)
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
        if cache is not None and self._reuse(cache, ids):
            kwargs[self._cache_kwarg] = cache.cache
        input_ids = torch.tensor([ids], device=self.model.device)
        with torch.inference_mode():
            out = self.model.base_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                 **kwargs)
        new = out.sequences[0, len(ids):].tolist()
        past = _output_cache(out)
        reply = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return reply, (TurnCache(ids + new[:-1], past) if past is not None else None)


def _output_cache(out: Any) -> Any:
    """The KV cache of a model/generate output: `cache` (transformers >= 5.x) or `past_key_values` (older)."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys:
            return out[name]
    return None


@contextlib.contextmanager
def _head_in_eval(model: RetrievalModel) -> Iterator[None]:
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
