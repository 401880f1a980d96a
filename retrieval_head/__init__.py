"""retrieval-head: give any causal LM a native `encode()` distilled from a sentence-transformers teacher."""

from .auto import register_auto_classes
from .config import RetrievalHeadConfig
from .head import ProjectionHead
from .model import BaseMismatchError, RetrievalModel, get_retrieval_model
from .persistence import HeadFolderError
from .version import __version__

register_auto_classes()

__all__ = [
    "BaseMismatchError",
    "HeadFolderError",
    "ProjectionHead",
    "RetrievalHeadConfig",
    "RetrievalModel",
    "__version__",
    "get_retrieval_model",
]
