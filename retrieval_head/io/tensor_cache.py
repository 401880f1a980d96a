"""Content-keyed caches of expensive tensors (LM features, teacher embeddings), stored as safetensors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from retrieval_head.io.folder import write_folder_atomically

logger = logging.getLogger(__name__)

TENSORS_NAME = "tensors.safetensors"
META_NAME = "meta.json"
SHARD_NAME = "shard-{}.safetensors"


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

    def sharded(self, kind: str, key: str) -> ShardedEntry:
        """The entry `kind`/`key` as named shards, written one at a time (a killed build resumes)."""
        return ShardedEntry([self.path(kind, key)])

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

    def sharded(self, kind: str, key: str) -> ShardedEntry:
        return ShardedEntry([self.path(kind, key)] + [other.path(kind, key) for other in self.read_only])


class ShardedEntry:
    """Named shards of one cache entry (a shard's name is a key of its own content).

    A shard is read from the first folder that holds it and written to the first folder, through a temporary file
    renamed into place: a killed build leaves finished shards and no partial one; a damaged shard reads as missing.
    """

    def __init__(self, folders: list[Path]) -> None:
        self.folders = folders
        self.folder = folders[0]

    def load(self, name: str) -> dict[str, torch.Tensor] | None:
        for folder in self.folders:
            path = folder / SHARD_NAME.format(name)
            if path.exists():
                try:
                    return load_file(str(path))
                except (SafetensorError, OSError) as err:
                    logger.warning("Ignoring damaged cache shard %s (%s); recomputing.", path, err)
        return None

    def has(self, name: str) -> bool:
        return any((folder / SHARD_NAME.format(name)).exists() for folder in self.folders)

    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if meta is not None and not (self.folder / META_NAME).exists():
            (self.folder / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        handle, tmp = tempfile.mkstemp(prefix=".shard-", suffix=".tmp", dir=self.folder)
        os.close(handle)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is read by whoever reads the folder
        try:
            save_file({name: t.contiguous() for name, t in tensors.items()}, tmp)
            os.replace(tmp, self.folder / SHARD_NAME.format(name))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
