"""Content-keyed caches of expensive tensors (LM features, teacher embeddings), stored as safetensors."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .persistence import write_folder_atomically

logger = logging.getLogger(__name__)

TENSORS_NAME = "tensors.safetensors"
META_NAME = "meta.json"


def cache_key(**parts: Any) -> str:
    """A sha256 over everything that determines the tensors (ids, revisions, layers, template, texts)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:24]


class TensorCache:
    """A folder of `<kind>-<key>/` entries, each `tensors.safetensors` plus `meta.json`; a reused entry is logged."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}"

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The cached tensors, or None when absent or unreadable (then they are recomputed)."""
        folder = self.path(kind, key)
        if not (folder / TENSORS_NAME).exists():
            return None
        try:
            return load_file(str(folder / TENSORS_NAME))
        except (SafetensorError, OSError) as err:
            logger.warning("Ignoring damaged cache entry %s (%s); recomputing.", folder, err)
            return None

    def get_or_compute(
        self, kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]], meta: dict[str, Any] | None = None
    ) -> dict[str, torch.Tensor]:
        """Load `kind`/`key`, or run `compute()` and store its tensors (atomically) for the next run."""
        cached = self.load(kind, key)
        if cached is not None:
            logger.info("Reusing cached %s from %s", kind, self.path(kind, key))
            return cached
        tensors = {name: t.contiguous() for name, t in compute().items()}

        def write(folder: Path) -> None:
            save_file(tensors, str(folder / TENSORS_NAME))
            (folder / META_NAME).write_text(json.dumps(meta or {}, indent=2, sort_keys=True, default=str) + "\n")

        write_folder_atomically(self.path(kind, key), write)
        return tensors


class LayeredCache(TensorCache):
    """A `TensorCache` that also reads entries from read-only folders (written entries go to `root` only)."""

    def __init__(self, root: str | Path, read_only: list[str | Path]) -> None:
        super().__init__(root)
        self.read_only = [TensorCache(r) for r in read_only]

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        found = super().load(kind, key)
        for other in self.read_only:
            if found is not None:
                break
            found = other.load(kind, key)
            if found is not None:
                logger.info("Reusing read-only %s from %s", kind, other.path(kind, key))
        return found
