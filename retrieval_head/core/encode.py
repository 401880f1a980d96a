"""`encode()` with sentence-transformers semantics, for any module that embeds rendered batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from retrieval_head.core.templates import EncodeInput, check_inputs, is_conversation

if TYPE_CHECKING:
    from retrieval_head.core.model import RetrievalModel

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def _resolve_prompt(model: RetrievalModel, prompt_name: str | None, prompt: str | None) -> str:
    if prompt is not None:
        return prompt
    if prompt_name is None:
        return ""
    prompts = model.config.prompts or {}
    if prompt_name not in prompts:
        raise ValueError(f"prompt_name={prompt_name!r} is not among the head's prompts {sorted(prompts)}.")
    return prompts[prompt_name]


def encode(
    model: RetrievalModel,
    inputs: EncodeInput | Sequence[EncodeInput],
    prompt_name: str | None = None,
    prompt: str | None = None,
    batch_size: int = 32,
    show_progress_bar: bool | None = None,
    output_value: Literal["sentence_embedding"] | None = "sentence_embedding",
    precision: Literal["float32", "int8", "uint8", "binary", "ubinary"] = "float32",
    convert_to_numpy: bool = True,
    convert_to_tensor: bool = False,
    device: str | torch.device | None = None,
    normalize_embeddings: bool = False,
    truncate_dim: int | None = None,
    **kwargs: Any,
) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
    """Embed texts or conversations like `SentenceTransformer.encode` (see `RetrievalModel.encode`)."""
    if kwargs:
        raise TypeError(f"encode() got unexpected keyword arguments: {', '.join(sorted(kwargs))}.")
    if output_value != "sentence_embedding":
        raise ValueError(f"output_value={output_value!r} is not supported; a head only gives 'sentence_embedding'.")
    precision = precision or "float32"  # sentence-transformers' evaluators pass None
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; use one of {PRECISIONS}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r} ({type(batch_size).__name__}).")
    if isinstance(inputs, bytes | bytearray):
        raise TypeError("encode() got bytes; decode them to a string first (e.g. data.decode('utf-8')).")
    if isinstance(inputs, Mapping):
        raise TypeError("encode() got a dict; give a string, a conversation (a list of {'role': ..., 'content': ...} "
                        "messages) or a list of those.")
    single = isinstance(inputs, str) or is_conversation(inputs)
    items = [inputs] if single else list(inputs)
    check_inputs(items)
    if device is not None:
        model.to(check_device(device))
    text_prompt = _resolve_prompt(model, prompt_name, prompt)
    if truncate_dim is not None and not 0 < truncate_dim <= model.config.output_dim:
        raise ValueError(f"truncate_dim must be in [1, {model.config.output_dim}], got {truncate_dim}.")
    dim = truncate_dim or model.config.output_dim

    order = np.argsort([-_length(item) for item in items], kind="stable")
    chunks: list[torch.Tensor] = []
    if show_progress_bar is None:
        show_progress_bar = False
    for start in tqdm(range(0, len(items), batch_size), desc="Batches", disable=not show_progress_bar):
        batch = [items[i] for i in order[start : start + batch_size]]
        with torch.inference_mode():
            embeddings = model.embed(batch, prompt=text_prompt)
        chunks.append(embeddings)
    embeddings = torch.cat(chunks) if chunks else torch.empty((0, model.config.output_dim))
    embeddings = embeddings[torch.as_tensor(np.argsort(order), dtype=torch.long)] if len(items) else embeddings
    embeddings = embeddings[:, :dim]
    if normalize_embeddings:
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    return _convert(embeddings, single, precision, convert_to_numpy, convert_to_tensor)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a `torch.device`, or a `ValueError` saying why this machine cannot run on it."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device ({err}); use e.g. 'cpu' or 'cuda:0'.") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but this torch sees no CUDA GPU; use device='cpu'.")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                             f"use an index below {torch.cuda.device_count()}.")
    return resolved


def _length(item: EncodeInput) -> int:
    return len(item) if isinstance(item, str) else sum(len(m["content"]) for m in item)


def _convert(
    embeddings: torch.Tensor, single: bool, precision: str, convert_to_numpy: bool, convert_to_tensor: bool
) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
    embeddings = embeddings.float()
    if precision != "float32":
        from sentence_transformers.quantization import quantize_embeddings

        quantized = quantize_embeddings(embeddings.cpu().numpy(), precision=precision)
        embeddings = torch.from_numpy(quantized)
    if convert_to_tensor:
        return embeddings[0] if single else embeddings
    if convert_to_numpy:
        array = embeddings.cpu().numpy()
        return array[0] if single else array
    rows = list(embeddings)
    return rows[0] if single else rows
