"""The optional encode adapter: a LoRA on the base, trained with the head, ON only while the head encodes.

A head normally reads the frozen base's states, so an agent gets query embeddings from the very states its
generation computes. The encode adapter trades that away for retention: a PEFT LoRA named `encode` is injected
into the base (`peft.inject_adapter_in_model`) and trained jointly with the head
(`retrieval_head.training.adapter_distillation.train_encode_adapter`). It is disabled by default and switched on only
inside `RetrievalModel.layer_states` (so `encode`, `embed`, `forward` see adapted states) and kept off around
`RetrievalModel.generate`, so generation is exactly the base's.

COST, plainly: in this mode the states generation computes are the *base's*, not the adapted ones the head was
trained on, so the agent path can no longer reuse generation's hidden states. Embedding a query the LM wrote
takes an extra pass of the LM with the adapter on (`model.encode(query_text)`), about the cost of prefilling
the query's text (plus its history). `NativeRetriever` therefore refuses a model with an encode adapter.

On disk: `encode_adapter/` inside the head folder, in PEFT's own format (`adapter_config.json` +
`adapter_model.safetensors`, keys as `PeftModel.save_pretrained` writes them, so
`PeftModel.from_pretrained(base, head_dir / "encode_adapter")` loads it too); never `adapter_config.json` at
the head folder's root. `config.encode_adapter` records r, alpha, target modules and a checksum of the
weights (`adapters.adapter_checksum`), checked on load.

Limits: the base must be a plain transformers model (not a `PeftModel` carrying an agent adapter): merge that
adapter first (`adapters.merge_adapter`, then save the merged model and name it as the base).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from retrieval_head.adapters.recorded import (
    ENCODE_ADAPTER_NAME,
    adapter_checksum,
    fingerprint_adapter,
    merged_fingerprint,
)
from retrieval_head.core.config import HeadFolderError
from retrieval_head.core.errors import RetrievalHeadError

if TYPE_CHECKING:
    from retrieval_head.core.model import RetrievalModel

ENCODE_ADAPTER_DIR = "encode_adapter"
"""Subfolder of a head folder holding the encode adapter (PEFT format)."""
_PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class EncodeAdapterError(RetrievalHeadError, ValueError):
    """The encode adapter is missing, does not match its record, or cannot be used where it was asked for."""


def has_encode_adapter(model: Any) -> bool:
    """Whether a `RetrievalModel` reads its states through an encode adapter (as its config records)."""
    config = getattr(model, "config", None)
    return bool(getattr(config, "encode_adapter", None))


def _lora_layers(base: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in base.modules() if isinstance(m, LoraLayer) and ENCODE_ADAPTER_NAME in m.lora_A]


def encode_adapter_parameters(model: RetrievalModel) -> list[nn.Parameter]:
    """The encode adapter's LoRA weights (what `train_encode_adapter` trains beside the head)."""
    return [p for layer in _lora_layers(model.base_model) for name in ("lora_A", "lora_B")
            for p in getattr(layer, name)[ENCODE_ADAPTER_NAME].parameters()]


def _switch(layers: list[nn.Module], enabled: bool) -> None:
    # PEFT's enable_adapters() also flips requires_grad of the adapter weights; keep the caller's flags, so a
    # backward() after the encode pass still reaches the LoRA weights while training.
    params = [p for layer in layers for name in ("lora_A", "lora_B") for p in getattr(layer, name).parameters()]
    flags = [p.requires_grad for p in params]
    for layer in layers:
        layer.enable_adapters(enabled)
    for p, flag in zip(params, flags, strict=True):
        p.requires_grad_(flag)


@contextlib.contextmanager
def _switched(model: RetrievalModel, enabled: bool) -> Iterator[None]:
    if not has_encode_adapter(model):
        yield
        return
    layers = _lora_layers(model.base_model)
    if not layers:
        raise EncodeAdapterError(
            f"The head's config records an encode adapter ({describe(model.config.encode_adapter)}), but the base "
            "carries none. Load the head with RetrievalModel.from_pretrained(head_folder), which restores it from "
            f"the folder's {ENCODE_ADAPTER_DIR}/."
        )
    current = not layers[0].disable_adapters
    if current == enabled:
        yield
        return
    _switch(layers, enabled)
    try:
        yield
    finally:
        _switch(layers, current)


def encode_adapter_on(model: RetrievalModel) -> contextlib.AbstractContextManager[None]:
    """Context: the encode adapter is active (a no-op for a model without one). Used by `layer_states`."""
    return _switched(model, True)


def encode_adapter_off(model: RetrievalModel) -> contextlib.AbstractContextManager[None]:
    """Context: the encode adapter is disabled (its default state). Used around `generate`."""
    return _switched(model, False)


def describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "none"
    checksum = str(record.get("checksum") or "")[:12]
    return f"LoRA r={record.get('r')}, alpha={record.get('alpha')}, targets {record.get('target_modules')}, " \
           f"sha256 {checksum or '?'}"


def _check_plain_base(model: RetrievalModel) -> None:
    base = model.base_model
    if callable(getattr(base, "get_base_model", None)) or fingerprint_adapter(base) is not None:
        raise EncodeAdapterError(
            "An encode adapter needs a plain base, but this model is a PEFT-adapted agent "
            f"({type(base).__name__}). Merge the agent's adapter into the base first "
            "(retrieval_head.adapters.merge_adapter), save the merged model and attach the head to it."
        )
    if merged_fingerprint(base) is not None or model.config.adapter_name_or_path or model.config.adapter_checksum:
        raise EncodeAdapterError(
            "An encode adapter on a head that records an agent adapter is not supported (reloading would rebuild "
            "the agent adapter as a PeftModel). Save the merged agent as a model and attach a fresh head to it."
        )


def _record(model: RetrievalModel) -> dict[str, Any]:
    lora = model.base_model.peft_config[ENCODE_ADAPTER_NAME]
    targets = lora.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return {
        "r": int(lora.r), "alpha": float(lora.lora_alpha), "target_modules": targets,
        "checksum": adapter_checksum(model.base_model, ENCODE_ADAPTER_NAME),
    }


def _inject(model: RetrievalModel, lora_config: Any) -> None:
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config, model.base_model, adapter_name=ENCODE_ADAPTER_NAME)
    model.base_model.requires_grad_(False)  # frozen until a trainer asks for the LoRA weights
    _switch(_lora_layers(model.base_model), False)  # off by default: the base computes what it computed before
    model.base_model.eval()


def add_encode_adapter(
    model: RetrievalModel, r: int = 8, alpha: float = 16.0, target_modules: Sequence[str] | str | None = None
) -> dict[str, Any]:
    """Inject a fresh LoRA (B = 0, so nothing changes until it is trained) named `encode` into the base.

    `target_modules=None` takes PEFT's default for the architecture (e.g. q_proj/v_proj for Llama). Returns the
    record written to `model.config.encode_adapter`.
    """
    from peft import LoraConfig

    if has_encode_adapter(model) or _lora_layers(model.base_model):
        raise EncodeAdapterError("This model already has an encode adapter.")
    _check_plain_base(model)
    targets = list(target_modules) if isinstance(target_modules, (list, tuple, set)) else target_modules
    lora_config = LoraConfig(
        r=int(r), lora_alpha=float(alpha), target_modules=targets, lora_dropout=0.0, bias="none",
        base_model_name_or_path=model.config.base_model_name_or_path, revision=model.config.revision,
    )
    _inject(model, lora_config)
    model.config.encode_adapter = _record(model)
    return model.config.encode_adapter


def refresh_record(model: RetrievalModel) -> dict[str, Any]:
    """Recompute `config.encode_adapter` (the checksum changes as the LoRA trains); done on every save."""
    model.config.encode_adapter = _record(model)
    return model.config.encode_adapter


def save_encode_adapter(model: RetrievalModel, folder: Path) -> None:
    """Write the encode adapter into `folder` (the head folder's `encode_adapter/`) in PEFT's format."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    base = model.base_model
    state = get_peft_model_state_dict(base, adapter_name=ENCODE_ADAPTER_NAME, save_embedding_layers=False)
    tensors = {_PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / _PEFT_WEIGHTS), metadata={"format": "pt"})
    lora_config = base.peft_config[ENCODE_ADAPTER_NAME]
    inference_mode = lora_config.inference_mode
    lora_config.inference_mode = True
    try:
        lora_config.save_pretrained(str(folder))
    finally:
        lora_config.inference_mode = inference_mode


def load_encode_adapter(model: RetrievalModel, head_folder: str | Path) -> None:
    """Restore the encode adapter `model.config.encode_adapter` records from `head_folder/encode_adapter/`."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    record = model.config.encode_adapter
    folder = Path(head_folder) / ENCODE_ADAPTER_DIR
    missing = [name for name in (_PEFT_CONFIG, _PEFT_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise HeadFolderError(
            f"{Path(head_folder) / 'config.json'} records an encode adapter ({describe(record)}), but "
            f"{folder} {'does not exist' if not folder.is_dir() else 'lacks ' + ', '.join(missing)}. The head was "
            f"trained with that LoRA on the base and is wrong without it: copy the whole head folder (with its "
            f"{ENCODE_ADAPTER_DIR}/ subfolder), or re-save the head with save_pretrained()."
        )
    _check_plain_base(model)
    lora_config = LoraConfig.from_pretrained(str(folder))
    lora_config.inference_mode = False
    _inject(model, lora_config)
    state = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(str(folder / _PEFT_WEIGHTS)).items()}
    result = set_peft_model_state_dict(model.base_model, state, adapter_name=ENCODE_ADAPTER_NAME)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    found = _record(model)
    if unexpected or (record.get("checksum") and found["checksum"] != record["checksum"]):
        raise HeadFolderError(
            f"{folder} does not hold the encode adapter {Path(head_folder) / 'config.json'} records "
            f"(recorded: {describe(record)}; found: {describe(found)}"
            f"{'; unexpected keys ' + str(unexpected[:3]) if unexpected else ''}). Re-save the head."
        )


def trainable(model: RetrievalModel, enabled: bool = True) -> list[nn.Parameter]:
    """Set requires_grad of the encode adapter's weights; returns them."""
    params = encode_adapter_parameters(model)
    for p in params:
        p.requires_grad_(enabled)
    return params

