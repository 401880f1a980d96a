"""Loading a head from a folder or a Hub repo, with its base (resolved offline for embedded models)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retrieval_head.core.quantization import check_quantize_to
from retrieval_head.io.embedded import load_base
from retrieval_head.io.folder import HeadFolderError, check_weights, read_config, read_weights

if TYPE_CHECKING:
    from retrieval_head.core.model import RetrievalModel

FROM_CONFIG = "config"
"""`quantize_head_to` default: the precision the head's config names (`RetrievalHeadConfig.quantize_to`)."""
_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download")


def resolve_head_folder(name_or_path: str | Path, **hub_kwargs: Any) -> Path:
    """A local folder as is (a local path always wins); otherwise the Hub repo's head files, downloaded."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise HeadFolderError(f"{path} is a file; give the folder written by save_pretrained().")
    from huggingface_hub.errors import HFValidationError

    from retrieval_head.io.hub import download_head

    try:
        return download_head(str(name_or_path), **hub_kwargs)
    except HFValidationError as err:
        raise HeadFolderError(
            f"{str(name_or_path)!r} is no such folder, and not a Hub repo id ('owner/name'): {err}. Give the folder "
            "written by save_pretrained() or a Hub repo id."
        ) from err


def load_retrieval_model(
    cls: type[RetrievalModel],
    head_name_or_path: str | Path,
    base_model: nn.Module | None = None,
    tokenizer: Any = None,
    config: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_merged: bool = False,
    quantize_head_to: str | None = FROM_CONFIG,
    **kwargs: Any,
) -> RetrievalModel:
    """Build base + head from a head folder/repo; `config` is accepted for transformers' Auto classes.

    `quantize_head_to` ("float16" or "int8") runs the head's dense layers with lower-precision weights on the
    CPU (`RetrievalModel.quantize_head`), None with fp32 weights; the default, "config", takes the head config's
    `quantize_to` when the head is on the CPU. Checked before anything loads.
    """
    hub_kwargs = {k: kwargs.pop(k) for k in _HUB_KWARGS if k in kwargs}
    for ignored in ("trust_remote_code", "_from_auto", "_from_pipeline", "adapter_kwargs", "proxies"):
        kwargs.pop(ignored, None)  # what transformers' Auto classes pass along (5.25 adds proxies / subfolder)
    subfolder = kwargs.pop("subfolder", None)
    if subfolder:
        raise ValueError(f"subfolder={subfolder!r} is not supported: a head folder holds its files at its root; "
                         "give the path (or Hub id) of that folder itself.")
    if kwargs:
        raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(sorted(kwargs))}.")
    if quantize_head_to not in (None, FROM_CONFIG):
        check_quantize_to(quantize_head_to)
    folder = resolve_head_folder(head_name_or_path, **hub_kwargs)
    head_config = read_config(folder)
    weights = read_weights(folder)
    if base_model is None:
        if not head_config.base_model_name_or_path:
            raise HeadFolderError(f"{folder} names no base model; pass base_model= to from_pretrained().")
        base_kwargs = {"dtype": dtype} if dtype is not None else {}
        base_kwargs.update({k: v for k, v in hub_kwargs.items() if k in ("token", "cache_dir", "local_files_only")})
        base_model, base_tokenizer = load_base(
            head_config.base_model_name_or_path, head_config.revision, **base_kwargs
        )
        tokenizer = tokenizer or base_tokenizer
        from retrieval_head.adapters.recorded import attach_recorded_adapter

        base_model = attach_recorded_adapter(base_model, head_config)
    if device is not None:
        base_model.to(device)
    model = cls(base_model, head_config, tokenizer=tokenizer, allow_merged=allow_merged)
    check_weights(model.head, weights, folder)
    model.head.load_state_dict(weights)
    if head_config.encode_adapter:
        from retrieval_head.adapters.encode_adapter import load_encode_adapter

        load_encode_adapter(model, folder)
    if quantize_head_to == FROM_CONFIG:
        quantize_head_to = head_config.quantize_to if config_quantizes(model.head) else None
    if quantize_head_to is not None:
        model.quantize_head(quantize_head_to)
    return model


def config_quantizes(head: nn.Module) -> bool:
    """Whether a loaded head runs with its config's `quantize_to`: one is named, and the head is on the CPU
    (elsewhere the fp32 weights are fast already, and quantized kernels are CPU-only)."""
    on_cpu = next(head.parameters()).device.type == "cpu"
    return bool(head.config.quantize_to) and head.head_type != "transformer" and on_cpu


def quantize_option(choice: str | None) -> str | None:
    """A command line's `--quantize-head-to` as `quantize_head_to`: unset = the config's, "float32" = None."""
    return FROM_CONFIG if choice is None else None if choice == "float32" else choice
