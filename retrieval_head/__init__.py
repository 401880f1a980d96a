"""retrieval-head: give any causal LM a native `encode()` distilled from a sentence-transformers teacher."""

from importlib import import_module
from typing import Any

from .auto import register_auto_classes
from .config import RetrievalHeadConfig
from .head import ProjectionHead
from .model import BaseMismatchError, RetrievalModel, get_retrieval_model
from .persistence import HeadFolderError
from .quantization import HeadQuantizationError
from .version import __version__

register_auto_classes()

# Heavier parts (faiss, sentence-transformers) load on first use, not at `import retrieval_head`.
_LAZY = {
    "DocumentIndex": ".index",
    "NativeRetriever": ".agent",
    "TeacherFingerprint": ".fingerprint",
    "load_sentence_transformer": ".sentence_transformers_modules",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'retrieval_head' has no attribute {name!r}")


__all__ = [
    "BaseMismatchError",
    "DocumentIndex",
    "HeadFolderError",
    "HeadQuantizationError",
    "NativeRetriever",
    "ProjectionHead",
    "RetrievalHeadConfig",
    "RetrievalModel",
    "TeacherFingerprint",
    "__version__",
    "get_retrieval_model",
    "load_sentence_transformer",
]
