"""Head folders on disk: atomic saves, safetensors weights only, and checked loads (never pickle)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from retrieval_head.core.config import CONFIG_NAME, HeadFolderError, RetrievalHeadConfig

WEIGHTS_NAME = "retrieval_head.safetensors"
HEAD_FILES = (CONFIG_NAME, WEIGHTS_NAME)
MODULES_NAME = "modules.json"
"""sentence-transformers' module list, written beside the head so `SentenceTransformer(folder)` loads it."""
ST_CONFIG_NAME = "config_sentence_transformers.json"
SAVED_MODULE = "retrieval_head.sentence_transformers_modules"
"""The import path saved folders name in `modules.json` (kept stable: heads saved by any version load)."""
INPUT_CLASS = f"{SAVED_MODULE}.RetrievalHeadInput"
HEAD_CLASS = f"{SAVED_MODULE}.RetrievalHeadPooling"


def write_folder_atomically(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(staging)` in a sibling folder, then swap it in; a failure leaves `target` as it was.

    Files already in `target` that `write` does not produce (a user's notes, logs) are carried over.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        write(staging)
        if target.exists():
            for entry in target.iterdir():
                if not (staging / entry.name).exists():
                    copy = shutil.copytree if entry.is_dir() else shutil.copy2
                    copy(entry, staging / entry.name)
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            backup.rmdir()
            target.rename(backup)
            staging.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def compact(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 tensor whose every value is exact in float16 (a trained static table: `round_static_table`)
    as float16, half the bytes and bit-identical once loaded back into the fp32 parameter; else unchanged."""
    if tensor.dtype != torch.float32 or tensor.numel() < 1 << 16:
        return tensor
    half = tensor.half()
    return half if torch.equal(half.float(), tensor) else tensor


def save_head(folder: Path, config: RetrievalHeadConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Write `config.json` and the head's weights (contiguous CPU tensors, `compact`) into `folder`."""
    tensors = {name: compact(t.detach().to("cpu").contiguous()) for name, t in state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "library": "retrieval-head"})
    (folder / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")


def read_config(folder: str | Path) -> RetrievalHeadConfig:
    """The head config of a folder, or `HeadFolderError` saying what the folder holds instead."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.exists():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        hint = " It looks like a PEFT adapter." if "adapter_config.json" in found else ""
        raise HeadFolderError(
            f"No {CONFIG_NAME} in {folder} (found: {', '.join(found) or 'nothing'}).{hint} "
            "Expected a retrieval head folder written by RetrievalModel.save_pretrained()."
        )
    return RetrievalHeadConfig.from_json_file(path)


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The head's tensors from safetensors, naming the file when it is missing or damaged."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.exists():
        raise HeadFolderError(f"No {WEIGHTS_NAME} in {path.parent}; the head's weights are missing. Re-save it.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise HeadFolderError(
            f"{path} is truncated or corrupted ({err}); restore it or re-save the head with save_pretrained()."
        ) from err


def check_weights(head: torch.nn.Module, weights: dict[str, torch.Tensor], folder: str | Path) -> None:
    """Raise `HeadFolderError` unless `weights` are exactly the head's tensors, in its shapes, all finite."""
    expected = head.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise HeadFolderError(
            f"{folder} has weights that do not fit its config (missing: {missing}, unexpected: {unexpected}); "
            "the folder was edited or written by another version. Re-save the head."
        )
    shapes = [f"{name} is {tuple(weights[name].shape)}, the config needs {tuple(t.shape)}"
              for name, t in expected.items() if weights[name].shape != t.shape]
    if shapes:
        raise HeadFolderError(f"{folder} has weights of the wrong shape ({'; '.join(shapes)}): config.json and "
                              f"{WEIGHTS_NAME} do not belong together. Re-save the head with save_pretrained().")
    broken = [name for name, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if broken:
        raise HeadFolderError(f"{folder} has weights holding NaN or inf ({', '.join(broken)}): the head would embed "
                              "NaN. Restore the folder or re-save a head trained without a diverged loss.")


def folder_size(folder: str | Path) -> int:
    """Bytes on disk of the files in a folder (for benchmarks and cards)."""
    return sum(os.path.getsize(p) for p in Path(folder).rglob("*") if p.is_file())
