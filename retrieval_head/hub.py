"""Hub I/O through huggingface_hub: download a head's files (push is `RetrievalModel.push_to_hub`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

HEAD_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt"]


def download_head(repo_id: str, revision: str | None = None, **kwargs: Any) -> Path:
    """Download (or read from the cache) the head files of a Hub repo."""
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HEAD_PATTERNS, **kwargs))
