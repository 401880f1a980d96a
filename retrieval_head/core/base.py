"""The causal LM under a head: what it is (architecture, sizes, id) and whether a head fits it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from retrieval_head.core.config import RetrievalHeadConfig
from retrieval_head.core.errors import RetrievalHeadError


class BaseMismatchError(RetrievalHeadError, ValueError):
    """The head was made for another base model than the one it is attached to."""


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def native_bfloat16() -> bool:
    """Whether this machine runs bfloat16 matrix products natively: a CUDA GPU that supports it, else a CPU with
    AVX-512-BF16 or AMX (where a bf16 LM pass is ~1.8x fp32's; elsewhere bf16 is emulated and several times slower).
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(callable(probe) and probe() for probe in probes)


def describe_base(model: nn.Module) -> dict[str, Any]:
    """Architecture, hidden size, layer count and id of a causal LM, as a head config records them."""
    config = base_of(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    architectures = getattr(config, "architectures", None) or [type(base_of(model)).__name__]
    return {
        "base_architecture": architectures[0],
        "base_hidden_size": int(text_config.hidden_size),
        "base_num_layers": int(text_config.num_hidden_layers),
        "base_vocab_size": int(text_config.vocab_size),
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def check_base(config: RetrievalHeadConfig, model: nn.Module) -> None:
    """Raise `BaseMismatchError` naming both sides when the head's recorded base differs from `model`.

    The adapter under the head is checked by `retrieval_head.adapters.check_adapter` (`RetrievalModel` runs both).
    """
    found = describe_base(model)
    for key in ("base_architecture", "base_hidden_size", "base_num_layers", "base_vocab_size"):
        expected = getattr(config, key)
        if expected is not None and expected != found[key]:
            raise BaseMismatchError(
                f"The head was trained on {config.base_model_name_or_path or 'a base'} with {key}={expected}, "
                f"but it is attached to {found['base_model_name_or_path'] or 'a model'} with {key}={found[key]}. "
                "Attach it to the base named in its config (RetrievalModel.from_pretrained loads it for you)."
            )
