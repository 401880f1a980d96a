"""PEFT adapters under a head: record which adapter the head was trained with, check it, and rebuild it on load.

A head reads the hidden states of the model it is attached to. On a `PeftModel` (e.g. a LoRA) those are the
*adapted* states, so the head only fits that adapter. The head config therefore records the adapter beside
the base: `adapter_name_or_path` + `adapter_revision` (where to load it from, so `RetrievalModel.from_pretrained`
can rebuild base + adapter + head) and `adapter_checksum` (what it is: a sha256 of its weights and scaling, so
the same adapter under another name still matches and a different one is refused, naming both).

Where the adapter came from: PEFT does not remember the id a `PeftModel` was loaded from, so `load_adapter()`
(a thin wrapper over `PeftModel.from_pretrained`) notes it on the model. An adapter made by `get_peft_model`,
or loaded by `PeftModel.from_pretrained` directly, has no known origin: the checksum is still recorded, and a
warning says to save the adapter and set `config.adapter_name_or_path` before saving the head.

Merged adapters: `merge_adapter()` (= `merge_and_unload()`) returns a plain model that remembers which adapter
was merged into it, and is accepted for a head trained on that adapter. A model merged elsewhere (a merged
checkpoint on disk) carries no such note: pass `allow_merged=True` to `RetrievalModel(...)` to accept it on
your word; the embeddings equal the unmerged adapter's up to float rounding.

Reuse review (issue 7, part 2) -- what PEFT / transformers give us, and where we don't use it:
- `PeftModel.from_pretrained` / `get_peft_model_state_dict` / `merge_and_unload`: used as is, here.
- `peft.PeftConfig` / `PeftConfigMixin`: not subclassed. Its `from_pretrained` reads `adapter_config.json` and
  its type registry (`PeftType`, `PEFT_TYPE_TO_CONFIG_MAPPING`) is a closed enum, so a head config would be
  unloadable and would make transformers / sentence-transformers try to load the head as an adapter. We
  follow its conventions instead (help metadata, `__post_init__` validation, `base_model_name_or_path` +
  `revision`, library version, unknown keys dropped with a warning, sorted indented JSON) on a transformers
  `PretrainedConfig`, which `AutoConfig` can dispatch on. Never write `adapter_config.json` for a head.
- `transformers.utils.PushToHubMixin`: `RetrievalModel` inherits it (the Hub helpers, and the interface
  transformers' Auto classes expect) but overrides `push_to_hub`: the mixin's version calls
  `save_pretrained(dir, max_shard_size=...)` (meaningless for one small head file) and replaces our rendered
  card with the repo's README or a blank template.
- `transformers.PreTrainedModel` is not the base class of `RetrievalModel`: its `from_pretrained` would load
  the head's weights as a whole model and its `save_pretrained` would save the frozen base too; we save the
  head's weights only and reference the base (and adapter) by id, like PEFT does.
- transformers' own PEFT integration (`model.load_adapter`, or `AutoModelForCausalLM.from_pretrained(adapter)`)
  is recognised below (fingerprinted and checked), but heads rebuild adapters through `PeftModel`, which
  works with every peft version the package supports.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from retrieval_head.core.base import BaseMismatchError
from retrieval_head.core.config import RetrievalHeadConfig

logger = logging.getLogger(__name__)

_ORIGINS_ATTR = "_retrieval_head_adapter_origins"  # {adapter name: (name_or_path, revision)} on a PeftModel
_MERGED_ATTR = "_retrieval_head_merged_adapter"  # AdapterFingerprint of the adapter merged into a model
# Config fields that change what an adapter computes besides its weights (scaling, decomposition).
_SCALING_FIELDS = ("peft_type", "lora_alpha", "use_rslora", "use_dora", "alpha_pattern", "rank_pattern")
_PEFT_PREFIX = "base_model.model."
ENCODE_ADAPTER_NAME = "encode"
"""PEFT adapter name of the head's own encode adapter (`encode_adapter.py`): never the agent's adapter."""


class AdapterMismatchError(BaseMismatchError):
    """The head was trained with another PEFT adapter (or none) than the model it is attached to carries."""


@dataclass(frozen=True)
class AdapterFingerprint:
    """Identity of the active PEFT adapter of a model: where it came from (if known) and a weight checksum."""

    name_or_path: str | None
    revision: str | None
    peft_type: str
    checksum: str
    adapter_name: str = "default"

    def describe(self) -> str:
        """E.g. `me/lora@abc123 (LORA, sha256 0123456789ab)` or `an adapter with no recorded id (LORA, ...)`."""
        name = (self.name_or_path + (f"@{self.revision}" if self.revision else "")) if self.name_or_path else None
        return f"{name or 'an adapter with no recorded id'} ({self.peft_type}, sha256 {self.checksum[:12]})"


def _describe_recorded(config: RetrievalHeadConfig) -> str:
    name = config.adapter_name_or_path
    if name and config.adapter_revision:
        name += f"@{config.adapter_revision}"
    checksum = f"sha256 {config.adapter_checksum[:12]}" if config.adapter_checksum else "no checksum"
    return f"{name or 'an adapter with no recorded id'} ({checksum})"


def _active_adapter_name(model: nn.Module) -> str | None:
    """Name of the active adapter of a PeftModel or of a transformers model with PEFT adapters, else None."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict) or not peft_config:
        return None
    active = getattr(model, "active_adapter", None)  # PeftModel: a str (a list for some tuners)
    if callable(active):  # transformers' integration: a method that needs peft >= 0.22; read the layers instead
        active = None
    if active is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
        active = layer.active_adapters if layer is not None else None
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise ValueError(
                f"The model has {len(active)} active adapters {list(active)}; a head reads one adapted model. "
                "Activate one with set_adapter(name), or combine them (add_weighted_adapter) and activate that."
            )
        active = active[0]
    if active == ENCODE_ADAPTER_NAME:  # the head's own encode adapter, not the agent's (see encode_adapter.py)
        return None
    return active if active in peft_config else None


def adapter_checksum(model: nn.Module, adapter_name: str = "default") -> str:
    """sha256 of an adapter's weights (rounded to bf16, so fp32/bf16 copies of one adapter match) and scaling.

    Keys are taken without PEFT's `base_model.model.` prefix and the adapter name, so the same adapter under
    another name, or loaded through transformers' integration instead of a `PeftModel`, gives the same sum.
    """
    from peft import get_peft_model_state_dict

    config = model.peft_config[adapter_name]
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    scaling = {}
    for name in _SCALING_FIELDS:
        value = getattr(config, name, None)
        scaling[name] = str(value) if name == "peft_type" else value
    digest = hashlib.sha256(json.dumps(scaling, sort_keys=True, default=str).encode("utf-8"))
    for key in sorted(state, key=lambda k: k.removeprefix(_PEFT_PREFIX)):
        tensor = state[key].detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{key.removeprefix(_PEFT_PREFIX)}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def fingerprint_adapter(model: nn.Module) -> AdapterFingerprint | None:
    """The fingerprint of the model's active PEFT adapter; None for a model without one.

    A model made by `merge_adapter` gives None too (it has no adapter); see `merged_fingerprint`.
    """
    name = _active_adapter_name(model)
    if name is None:
        return None
    config = model.peft_config[name]
    origin = getattr(model, _ORIGINS_ATTR, {}).get(name, (None, None))
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    return AdapterFingerprint(origin[0], origin[1], str(peft_type), adapter_checksum(model, name), name)


def merged_fingerprint(model: nn.Module) -> AdapterFingerprint | None:
    """The fingerprint of the adapter `merge_adapter` merged into `model`, if it did."""
    return getattr(model, _MERGED_ATTR, None)


def load_adapter(
    base_model: nn.Module, adapter_name_or_path: str, revision: str | None = None, **kwargs: Any
) -> nn.Module:
    """`PeftModel.from_pretrained(base_model, adapter_name_or_path, revision=...)`, remembering where it came from.

    Use it instead of `PeftModel.from_pretrained` when attaching a head, so the head config records the
    adapter's id and `RetrievalModel.from_pretrained` can rebuild it.
    """
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_name_or_path), revision=revision, **kwargs)
    name = kwargs.get("adapter_name", "default")
    origins = dict(getattr(model, _ORIGINS_ATTR, {}))
    origins[name] = (str(adapter_name_or_path), revision)
    object.__setattr__(model, _ORIGINS_ATTR, origins)  # a plain attribute, not a module or parameter
    return model


def merge_adapter(model: nn.Module, **kwargs: Any) -> nn.Module:
    """`model.merge_and_unload(**kwargs)`, noting on the result which adapter was merged into it.

    A head trained on the adapter is then accepted on the merged model without `allow_merged=True`.
    """
    fingerprint = fingerprint_adapter(model)
    if fingerprint is None:
        raise ValueError("The model carries no active PEFT adapter to merge.")
    merged = model.merge_and_unload(**kwargs)
    object.__setattr__(merged, _MERGED_ATTR, fingerprint)
    return merged


def attach_recorded_adapter(base_model: nn.Module, config: RetrievalHeadConfig) -> Any:
    """Wrap `base_model` in the PEFT adapter the config names (if any), loaded by id + revision."""
    if not config.adapter_name_or_path:
        if config.adapter_checksum:
            raise AdapterMismatchError(
                f"The head was trained with an adapter that was never saved under a name "
                f"({_describe_recorded(config)}), so it cannot be rebuilt. Load the adapted model yourself "
                "and pass it: RetrievalModel.from_pretrained(head, base_model=peft_model, tokenizer=...)."
            )
        return base_model
    return load_adapter(base_model, config.adapter_name_or_path, revision=config.adapter_revision)


def record_adapter(config: RetrievalHeadConfig, model: nn.Module, allow_merged: bool = False) -> None:
    """Fill the adapter fields of a fresh config (one not yet attached) from the model it is attached to.

    A name set by the user (`config.adapter_name_or_path`) is kept; the checksum is always taken from the model.
    """
    found = fingerprint_adapter(model)
    if found is None:
        merged = merged_fingerprint(model)
        if merged is not None:
            config.adapter_name_or_path = config.adapter_name_or_path or merged.name_or_path
            config.adapter_revision = config.adapter_revision or merged.revision
            config.adapter_checksum = merged.checksum
        elif config.adapter_name_or_path and not allow_merged:
            raise AdapterMismatchError(
                f"The config names the adapter {config.adapter_name_or_path}, but the model carries no PEFT adapter. "
                "Attach the head to the adapted model (retrieval_head.adapters.load_adapter(base, id)); if the "
                "adapter is merged into this model (merge_and_unload), pass allow_merged=True."
            )
        return
    config.adapter_checksum = found.checksum
    peft_config = model.peft_config[found.adapter_name]
    if config.base_model_name_or_path is None:  # PEFT names the base its adapter was made on
        config.base_model_name_or_path = getattr(peft_config, "base_model_name_or_path", None)
    if config.revision is None:
        config.revision = getattr(peft_config, "revision", None)
    if config.adapter_name_or_path:
        if found.name_or_path and found.name_or_path != config.adapter_name_or_path:
            logger.info(
                "Recording the adapter as %s (set in the config); it was loaded from %s.",
                config.adapter_name_or_path, found.name_or_path,
            )
        return
    if found.name_or_path:
        config.adapter_name_or_path, config.adapter_revision = found.name_or_path, found.revision
        return
    logger.warning(
        "The head is attached to %s, whose origin is unknown (made by get_peft_model, or loaded by "
        "PeftModel.from_pretrained rather than retrieval_head.adapters.load_adapter). Its checksum is recorded, "
        "but the head can only be reloaded with that adapted model passed as base_model=. Save the adapter "
        "(peft_model.save_pretrained(dir) or push_to_hub(repo)) and set model.config.adapter_name_or_path "
        "(and adapter_revision) before saving the head, so from_pretrained can rebuild it.",
        found.describe(),
    )


def check_adapter(config: RetrievalHeadConfig, model: nn.Module, allow_merged: bool = False) -> None:
    """Raise `AdapterMismatchError` naming both when the model's adapter is not the one the head recorded.

    Only for a config already attached once (its base recorded); a fresh config is filled by `record_adapter`.
    """
    if config.base_architecture is None:
        return
    base = config.base_model_name_or_path or "its base"
    found = fingerprint_adapter(model)
    recorded = bool(config.adapter_name_or_path or config.adapter_checksum)
    if not recorded:
        if found is not None:
            raise AdapterMismatchError(
                f"The head was trained on the bare base {base} (no adapter), but it is attached to that base with "
                f"the adapter {found.describe()}. Attach it to the base without the adapter "
                "(peft_model.unload(), or load the base again)."
            )
        return
    if found is None:
        merged = merged_fingerprint(model)
        if merged is not None and (not config.adapter_checksum or merged.checksum == config.adapter_checksum):
            return
        if allow_merged and merged is None:
            logger.info("Accepting %s as merged into the model (allow_merged=True).", _describe_recorded(config))
            return
        what = f"a model with the adapter {merged.describe()} merged in" if merged else "a model with no adapter"
        raise AdapterMismatchError(
            f"The head was trained on {base} with the adapter {_describe_recorded(config)}, but it is attached to "
            f"{what}. Load it with RetrievalModel.from_pretrained(head) (which attaches the recorded adapter), or "
            "wrap the base with retrieval_head.adapters.load_adapter(base, adapter_id); if this model has that "
            "adapter merged in (merge_and_unload), pass allow_merged=True."
        )
    if config.adapter_checksum:
        mismatch = found.checksum != config.adapter_checksum
    else:  # a config written by hand: compare names when both are known
        mismatch = bool(found.name_or_path) and found.name_or_path != config.adapter_name_or_path
    if mismatch:
        raise AdapterMismatchError(
            f"The head was trained on {base} with the adapter {_describe_recorded(config)}, but it is attached to "
            f"the adapter {found.describe()}. Attach the head to the adapter it was trained with "
            "(RetrievalModel.from_pretrained(head) loads it), or train a head for this adapter."
        )
