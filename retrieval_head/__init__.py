"""retrieval-head: give any causal LM a native `encode()` distilled from a sentence-transformers teacher."""

from importlib import import_module
from typing import Any

from retrieval_head import _moved
from retrieval_head.core.base import BaseMismatchError
from retrieval_head.core.config import HeadFolderError, RetrievalHeadConfig
from retrieval_head.core.errors import RetrievalHeadError
from retrieval_head.core.head import ProjectionHead
from retrieval_head.core.model import RetrievalModel, get_retrieval_model
from retrieval_head.core.quantization import HeadQuantizationError
from retrieval_head.io.auto import register_auto_classes
from retrieval_head.version import __version__

register_auto_classes()
_moved.install()

# Heavier parts (faiss, sentence-transformers) load on first use, not at `import retrieval_head`.
_LAZY = {
    "DocumentIndex": ".retrieval.index",
    "NativeRetriever": ".agent",
    "TeacherFingerprint": ".retrieval.fingerprint",
    "load_sentence_transformer": ".io.sentence_transformers_modules",
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
    "RetrievalHeadError",
    "RetrievalModel",
    "TeacherFingerprint",
    "__version__",
    "get_retrieval_model",
    "load_sentence_transformer",
]
