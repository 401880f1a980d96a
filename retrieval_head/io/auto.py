"""transformers Auto-class registration: `AutoConfig`/`AutoModel.from_pretrained(head)` give a RetrievalModel."""

from __future__ import annotations

import contextlib

from transformers import AutoConfig, AutoModel

from retrieval_head.core.config import MODEL_TYPE, RetrievalHeadConfig
from retrieval_head.core.model import RetrievalModel


def register_auto_classes() -> None:
    """Register the head's config and model with transformers (idempotent)."""
    with contextlib.suppress(ValueError):  # already registered
        AutoConfig.register(MODEL_TYPE, RetrievalHeadConfig)
    with contextlib.suppress(ValueError):
        AutoModel.register(RetrievalHeadConfig, RetrievalModel)
