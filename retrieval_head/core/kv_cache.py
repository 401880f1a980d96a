"""The KV cache's names across transformers versions: `cache` (>= 5.x) or `past_key_values` (older)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def cache_kwarg(model: nn.Module) -> str:
    """The keyword `model.forward` (and `generate`) takes a KV cache by: `cache`, else `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model or `generate` output (`cache` or `past_key_values`), or None."""
    keys = out.keys() if hasattr(out, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys:
            return out[name]
    return None
