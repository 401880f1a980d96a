"""One LM pass per text: the head's weight-free input features at several layers, for training and probing."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .cache import TensorCache, cache_key
from .kv_cache import cache_kwarg, output_cache
from .model import RetrievalModel, base_of
from .pooling import pool
from .templates import EncodeInput, RenderedInput


def feature_key(pooling: str, layer: int) -> str:
    """Name of a cached feature tensor, e.g. `mean.L20` (layer = index into `output_hidden_states`)."""
    return f"{pooling}.L{layer}"


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
) -> dict[str, torch.Tensor]:
    """Standardised, pooled span states per (pooling, layer) as fp16 [N, H]; optionally span tokens of one layer.

    `tokens.L{token_layer}` holds every span token ([sum of span lengths, H]) and `token_offsets` [N + 1] where
    each text's tokens start, which is all a token-level (`transformer`) head reads.
    """
    renderer = model.renderer
    rendered = [renderer.render(item, prompt) for item in items]
    prefix_cache, rendered = _shared_prefix(model, rendered)
    order = sorted(range(len(items)), key=lambda i: -len(rendered[i].input_ids))
    hidden = model.config.base_hidden_size
    out = {feature_key(p, layer): torch.empty((len(items), hidden), dtype=torch.float16)
           for p in poolings for layer in layers}
    span_tokens: list[torch.Tensor | None] = [None] * len(items)
    base = model.base_model
    for start in tqdm(range(0, len(items), batch_size), desc="LM hidden states", disable=not show_progress_bar):
        rows = order[start : start + batch_size]
        batch = renderer.collate([rendered[i] for i in rows], device=model.device)
        states = _run(base, batch, prefix_cache)
        mask = batch["span_mask"]
        for layer in sorted(set(layers) | ({token_layer} if token_layer is not None else set())):
            standardized = torch.nn.functional.layer_norm(states[layer].float(), (hidden,))
            if layer in layers:
                for p in poolings:
                    out[feature_key(p, layer)][rows] = pool(standardized, mask, p).half().cpu()
            if layer == token_layer:
                for j, i in enumerate(rows):
                    span_tokens[i] = standardized[j][mask[j].bool()].half().cpu()
    if token_layer is not None:
        lengths = torch.tensor([t.shape[0] for t in span_tokens])
        out[f"tokens.L{token_layer}"] = torch.cat(span_tokens)
        out["token_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return out


def _shared_prefix(
    model: RetrievalModel, rendered: list[RenderedInput]
) -> tuple[tuple[Any, int] | None, list[RenderedInput]]:
    """Run the tokens every input starts with (system prompt, role tags) once and keep their KV cache.

    The states of the rest are the same as in one full pass (causal attention), at a fraction of the cost.
    """
    ids = [r.input_ids for r in rendered]
    limit = min((r.span_start for r in rendered), default=0)
    length = 0
    while length < limit and len({i[length] for i in ids}) == 1:
        length += 1
    if length == 0:
        return None, rendered
    prefix = torch.tensor([ids[0][:length]], device=model.device)
    cache = output_cache(model.base_model(input_ids=prefix, use_cache=True))
    suffixes = [RenderedInput(r.input_ids[length:], r.span_start - length, r.span_end - length) for r in rendered]
    return (cache, length), suffixes


def _run(base: Any, batch: dict[str, torch.Tensor], prefix_cache: tuple[Any, int] | None) -> tuple[torch.Tensor, ...]:
    """All hidden states of a batch (continuing from the shared prefix's cache when there is one)."""
    if prefix_cache is None:
        return base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, use_cache=False).hidden_states
    cache, length = prefix_cache
    rows = batch["input_ids"].shape[0]
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(rows)
    ones = torch.ones((rows, length), dtype=batch["attention_mask"].dtype, device=batch["attention_mask"].device)
    return base(input_ids=batch["input_ids"], attention_mask=torch.cat([ones, batch["attention_mask"]], dim=1),
                output_hidden_states=True, **{cache_kwarg(base_of(base)): cache}).hidden_states


def cached_features(
    model: RetrievalModel,
    items: Sequence[EncodeInput],
    cache: TensorCache,
    layers: Sequence[int],
    poolings: Sequence[str] = ("mean",),
    token_layer: int | None = None,
    prompt: str = "",
    batch_size: int = 16,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """`extract_features`, computed once per base id + revision + layers + template + texts, then reused."""
    config = model.config
    key = cache_key(
        base=config.base_model_name_or_path, revision=config.revision, adapter=config.adapter_name_or_path,
        adapter_revision=config.adapter_revision, template=config.query_template, system=config.system_prompt,
        max_length=config.max_length, prompt=prompt, layers=sorted(layers), poolings=sorted(poolings),
        token_layer=token_layer, items=hashlib.sha256(json.dumps(list(items)).encode()).hexdigest(),
    )
    return cache.get_or_compute(
        "features", key,
        lambda: extract_features(model, items, layers, poolings, token_layer, prompt, batch_size, show_progress_bar),
        meta={"base": config.base_model_name_or_path, "layers": list(layers), "items": len(items)},
    )
