"""Writing a head folder: weights, config, and what makes it loadable elsewhere (card, sentence-transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .persistence import save_head, write_folder_atomically

if TYPE_CHECKING:
    from .model import RetrievalModel


def write_head_folder(model: RetrievalModel, save_directory: str | Path, **kwargs: Any) -> Path:
    """Atomically write the head's files into `save_directory` (the base is referenced, never copied)."""
    if kwargs:
        raise TypeError(f"save_pretrained() got unexpected keyword arguments: {', '.join(sorted(kwargs))}.")
    state = model.head.state_dict()

    def write(folder: Path) -> None:
        save_head(folder, model.config, state)

    return write_folder_atomically(save_directory, write)
