"""transformers Auto-class registration: `AutoConfig`/`AutoModel.from_pretrained(head)` give a RetrievalModel."""

from __future__ import annotations

import contextlib

from transformers import AutoConfig, AutoModel

from .config import MODEL_TYPE, RetrievalHeadConfig
from .model import RetrievalModel


def register_auto_classes() -> None:
    """Register the head's config and model with transformers (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, RetrievalHeadConfig)
    except ValueError:  # already registered
        pass
    with contextlib.suppress(ValueError):
        AutoModel.register(RetrievalHeadConfig, RetrievalModel)
