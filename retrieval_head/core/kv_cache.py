"""The KV cache's names across transformers versions (`cache` in >= 5.x, `past_key_values` before), and forwards
run for their cache alone."""

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


def cache_only(model: nn.Module) -> dict[str, Any]:
    """Forward kwargs for a pass whose logits are thrown away (a prefill kept for its KV cache and hidden states):
    `logits_to_keep=1`, so the LM head runs on the last position only, not on every token (a 250-token prefill of
    SmolLM2-135M spends ~20% of its time on the 49k-vocabulary logits otherwise). Models whose `forward` (under a
    PEFT wrapper: the wrapped model's) does not name it get nothing."""
    from retrieval_head.core.base import base_of

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base_of(model).forward).parameters else {}
