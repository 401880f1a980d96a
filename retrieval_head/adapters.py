"""PEFT adapters under a head: record which adapter the head was trained with, and rebuild it on load."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import RetrievalHeadConfig


def attach_recorded_adapter(base_model: nn.Module, config: RetrievalHeadConfig) -> Any:
    """Wrap `base_model` in the PEFT adapter the config names (if any), loaded by id + revision."""
    if not config.adapter_name_or_path:
        return base_model
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, config.adapter_name_or_path, revision=config.adapter_revision)
