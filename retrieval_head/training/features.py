"""One LM pass per text: the head's weight-free input features at several layers, for training and probing."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from retrieval_head.core.base import base_of
from retrieval_head.core.kv_cache import cache_kwarg, cache_only, output_cache
from retrieval_head.core.layer_states import hidden_states_at, inner_model
from retrieval_head.core.model import RetrievalModel
from retrieval_head.core.pooling import pool
from retrieval_head.core.templates import EncodeInput, RenderedInput
from retrieval_head.io.tensor_cache import ShardedEntry, TensorCache, cache_key

FORMAT_VERSION = 2  # 2: sharded, with span token ids
SHARD_SIZE = 1024  # texts per cache shard


def feature_key(pooling: str, layer: int) -> str:
    """Name of a cached feature tensor, e.g. `mean.L20` (layer = index into `output_hidden_states`)."""
    return f"{pooling}.L{layer}"


AUTOCAST_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@torch.inference_mode()
def extract_features(
    model: RetrievalModel,
    items: Sequence[EncodeInput],
    layers: Sequence[int],
    poolings: Sequence[str] = ("mean",),
    token_layer: int | None = None,
    prompt: str = "",
    batch_size: int = 16,
    show_progress_bar: bool = True,
    autocast: str = "float32",
    prefix_cache: tuple[Any, int] | None | bool = True,
    progress: Any = None,
) -> dict[str, torch.Tensor]:
    """Standardised, pooled span states per (pooling, layer) as fp16 [N, H], and the span's token ids.

    `span_ids` holds every text's span token ids ([sum of span lengths], int32) and `span_offsets` [N + 1] where
    each text's ids start. With `token_layer`, `tokens.L{token_layer}` holds every span token's state
    ([sum of span lengths, H]) at the same offsets (also as `token_offsets`), which is all a token-level
    (`transformer`) head reads. The LM runs only up to the deepest layer asked for and computes no logits;
    `autocast="bfloat16"` runs it under `torch.autocast` (states are standardised in fp32 either way).
    `progress` (a tqdm bar) is advanced by the texts of each batch.
    """
    if autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast={autocast!r}: choose one of {sorted(AUTOCAST_DTYPES)}")
    renderer = model.renderer
    rendered = [renderer.render(item, prompt) for item in items]
    if prefix_cache is True:
        prefix_cache, rendered = _shared_prefix(model, rendered)
    elif prefix_cache is False:
        prefix_cache = None
    elif prefix_cache:
        rendered = _strip_prefix(rendered, prefix_cache[1])
    order = sorted(range(len(items)), key=lambda i: -len(rendered[i].input_ids))
    hidden = model.config.base_hidden_size
    out = {feature_key(p, layer): torch.empty((len(items), hidden), dtype=torch.float16)
           for p in poolings for layer in layers}
    span_tokens: list[torch.Tensor | None] = [None] * len(items)
    span_ids: list[torch.Tensor | None] = [None] * len(items)
    wanted = sorted(set(layers) | ({token_layer} if token_layer is not None else set()))
    base = base_of(model.base_model)
    dtype = AUTOCAST_DTYPES[autocast]
    for start in tqdm(range(0, len(items), batch_size), desc="LM hidden states", disable=not show_progress_bar):
        rows = order[start : start + batch_size]
        batch = renderer.collate([rendered[i] for i in rows], device=model.device)
        with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
            states = _run(base, wanted, batch, prefix_cache)
        mask = batch["span_mask"]
        for j, i in enumerate(rows):
            span_ids[i] = batch["input_ids"][j][mask[j].bool()].to(torch.int32).cpu()
        for layer in wanted:
            standardized = torch.nn.functional.layer_norm(states[layer].float(), (hidden,))
            if layer in layers:
                for p in poolings:
                    out[feature_key(p, layer)][rows] = pool(standardized, mask, p).half().cpu()
            if layer == token_layer:
                for j, i in enumerate(rows):
                    span_tokens[i] = standardized[j][mask[j].bool()].half().cpu()
        if progress is not None:
            progress.update(len(rows))
    lengths = torch.tensor([t.shape[0] for t in span_ids], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    out["span_ids"] = torch.cat(span_ids) if span_ids else torch.zeros(0, dtype=torch.int32)
    out["span_offsets"] = offsets
    if token_layer is not None:
        out[f"tokens.L{token_layer}"] = torch.cat(span_tokens) if span_tokens else torch.zeros((0, hidden))
        out["token_offsets"] = offsets.clone()
    return out


def _shared_prefix(
    model: RetrievalModel, rendered: list[RenderedInput]
) -> tuple[tuple[Any, int] | None, list[RenderedInput]]:
    """Run the tokens every input starts with (system prompt, role tags) once and keep their KV cache.

    The states of the rest are the same as in one full pass (causal attention), at a fraction of the cost.
    """
    prefix = shared_prefix_cache(model, rendered)
    return prefix, (_strip_prefix(rendered, prefix[1]) if prefix else rendered)


def shared_prefix_cache(model: RetrievalModel, rendered: Sequence[RenderedInput]) -> tuple[Any, int] | None:
    """(KV cache, length) of the longest token prefix every input shares before its span, or None."""
    ids = [r.input_ids for r in rendered]
    limit = min((r.span_start for r in rendered), default=0)
    length = 0
    while length < limit and len({i[length] for i in ids}) == 1:
        length += 1
    if length == 0:
        return None
    prefix = torch.tensor([ids[0][:length]], device=model.device)
    with torch.inference_mode():
        cache = output_cache(model.base_model(input_ids=prefix, use_cache=True, **cache_only(model.base_model)))
    return cache, length


def _strip_prefix(rendered: list[RenderedInput], length: int) -> list[RenderedInput]:
    return [RenderedInput(r.input_ids[length:], r.span_start - length, r.span_end - length) for r in rendered]


def _run(base: Any, layers: Sequence[int], batch: dict[str, torch.Tensor],
         prefix_cache: tuple[Any, int] | None) -> dict[int, torch.Tensor]:
    """The wanted layers' states of a batch (continuing from the shared prefix's cache when there is one)."""
    if prefix_cache is None:
        return hidden_states_at(base, layers, batch["input_ids"], batch["attention_mask"])
    cache, length = prefix_cache
    rows = batch["input_ids"].shape[0]
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(rows)
    ones = torch.ones((rows, length), dtype=batch["attention_mask"].dtype, device=batch["attention_mask"].device)
    return hidden_states_at(base, layers, batch["input_ids"], torch.cat([ones, batch["attention_mask"]], dim=1),
                            use_cache=True, **{cache_kwarg(inner_model(base)): cache})


def cached_features(
    model: RetrievalModel,
    items: Sequence[EncodeInput],
    cache: TensorCache,
    layers: Sequence[int],
    shard_size: int = SHARD_SIZE,
    **settings: Any,
) -> dict[str, torch.Tensor]:
    """`extract_features`, computed once per base id + revision + dtype + layers + template + texts, then reused.

    Built in shards of `shard_size` consecutive texts, each written as soon as it is done and named by a key of
    its texts: memory stays flat while building, a killed build resumes at the first missing shard, and a list
    that starts with another's shards (a larger sample of the same shuffled corpus) reuses them. `settings` are
    `build_features`'s (poolings, token_layer, prompt, batch_size, show_progress_bar, autocast). Under
    `accelerate launch` each process builds its share first (`build_features(..., rank=, world_size=)`), then,
    after a barrier, this reads them all.
    """
    entry = build_features(model, items, cache, layers, shard_size=shard_size, **settings)
    names = shard_names(items, shard_size)
    missing = [name for name in names if not entry.has(name)]
    if missing:
        raise RuntimeError(f"{len(missing)} feature shards of {entry.folder} are not built yet: call again after "
                           "every rank has finished (accelerator.wait_for_everyone())")
    chunks = _chunks(items, shard_size)
    return concat_shards([_checked(entry.load(n), n, entry.folder, len(c)) for n, c in zip(names, chunks, strict=True)])


def build_features(
    model: RetrievalModel,
    items: Sequence[EncodeInput],
    cache: TensorCache,
    layers: Sequence[int],
    poolings: Sequence[str] = ("mean",),
    token_layer: int | None = None,
    prompt: str = "",
    batch_size: int = 16,
    show_progress_bar: bool = True,
    autocast: str = "float32",
    shard_size: int = SHARD_SIZE,
    rank: int = 0,
    world_size: int = 1,
    first_shard: int = 0,
) -> ShardedEntry:
    """Build the missing feature shards of `items` that are this rank's (all of them with one process) and
    return their cache entry; `cached_features` reads them. Shard `i` is rank `(first_shard + i) % world_size`'s:
    numbering shards across several lists (`first_shard`) spreads many small lists over the ranks too. A progress
    bar over this rank's texts, with an ETA."""
    entry = cache.sharded("features", feature_settings_key(model, layers, poolings, token_layer, prompt, autocast))
    chunks, names = _chunks(items, shard_size), shard_names(items, shard_size)
    mine = [i for i in range(len(chunks)) if (first_shard + i) % world_size == rank]
    todo = [i for i in mine if not _valid(entry, names[i], len(chunks[i]))]
    if not todo:
        return entry
    total = sum(len(chunks[i]) for i in mine)
    done = total - sum(len(chunks[i]) for i in todo)
    prefix = shared_prefix_cache(model, [model.renderer.render(item, prompt) for item in items]) if items else None
    meta = {"base": model.config.base_model_name_or_path, "layers": list(layers), "poolings": list(poolings),
            "token_layer": token_layer, "autocast": autocast, "shard_size": shard_size}
    with tqdm(total=total, initial=done, desc="LM hidden states", unit="text", disable=not show_progress_bar) as bar:
        for index in todo:
            tensors = extract_features(model, chunks[index], layers, poolings, token_layer, prompt, batch_size, False,
                                       autocast, prefix_cache=prefix, progress=bar)
            entry.save(names[index], tensors, meta)
    return entry


def with_static_ids(model: RetrievalModel, items: Sequence[EncodeInput],
                    features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`features` whose `span_ids` are what the head's static branch reads: for a conversation-wide branch
    (`static_span="conversation"`), each conversation's message ids, found by tokenizing (no LM pass); texts and
    a span-only branch keep the cached span ids."""
    if model.config.static_span != "conversation" or "span_ids" not in features:
        return features
    renderer, ids, starts = model.renderer, features["span_ids"], features["span_offsets"]
    pieces = [ids[starts[i] : starts[i + 1]] if isinstance(item, str)
              else torch.tensor(renderer.render(item).static_ids(), dtype=torch.int32)
              for i, item in enumerate(items)]
    lengths = torch.tensor([p.shape[0] for p in pieces], dtype=torch.long)
    out = dict(features)
    out["span_ids"] = torch.cat(pieces) if pieces else ids[:0]
    out["span_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return out


def feature_settings_key(model: RetrievalModel, layers: Sequence[int], poolings: Sequence[str],
                         token_layer: int | None, prompt: str, autocast: str) -> str:
    """Everything the features depend on but the texts: base (+ adapter) id, revision and dtype, template, layers..."""
    config = model.config
    return cache_key(
        format=FORMAT_VERSION, base=config.base_model_name_or_path, revision=config.revision,
        adapter=config.adapter_name_or_path, adapter_revision=config.adapter_revision,
        template=config.query_template, system=config.system_prompt, max_length=config.max_length, prompt=prompt,
        layers=sorted(layers), poolings=sorted(poolings), token_layer=token_layer, autocast=autocast,
        dtype=str(model.dtype),
    )


def _chunks(items: Sequence[EncodeInput], shard_size: int) -> list[Sequence[EncodeInput]]:
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: give a positive number of texts per shard")
    return [items[i : i + shard_size] for i in range(0, len(items), shard_size)] or [items[:0]]


def shard_names(items: Sequence[EncodeInput], shard_size: int) -> list[str]:
    """One name per shard of `shard_size` consecutive texts: a key of those texts."""
    return [cache_key(items=list(chunk)) for chunk in _chunks(items, shard_size)]


def _valid(entry: ShardedEntry, name: str, rows: int) -> bool:
    """Whether shard `name` exists and holds `rows` texts (a damaged or mismatched one is rebuilt)."""
    if not entry.has(name):
        return False
    shard = entry.load(name)
    return shard is not None and int(shard["span_offsets"].shape[0]) == rows + 1


def _checked(shard: dict[str, torch.Tensor] | None, name: str, folder: Any, rows: int) -> dict[str, torch.Tensor]:
    if shard is None or int(shard["span_offsets"].shape[0]) != rows + 1:
        raise RuntimeError(f"feature shard {name} of {folder} is missing or holds the wrong number of texts; "
                           "delete that shard file and run again to rebuild it")
    return shard


def concat_shards(shards: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One feature dict from consecutive shards (offset tensors shifted to index the joined token tensors)."""
    out: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        if name.endswith("offsets"):
            pieces, start = [torch.zeros(1, dtype=torch.long)], 0
            for shard in shards:
                pieces.append(shard[name][1:] + start)
                start += int(shard[name][-1])
            out[name] = torch.cat(pieces)
        else:
            out[name] = torch.cat([shard[name] for shard in shards])
    return out
