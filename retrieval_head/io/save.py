"""Writing a head folder: weights, config, and what makes it loadable elsewhere (card, sentence-transformers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval_head.adapters.encode_adapter import (
    ENCODE_ADAPTER_DIR,
    has_encode_adapter,
    refresh_record,
    save_encode_adapter,
)
from retrieval_head.core.config import RetrievalHeadConfig
from retrieval_head.io.folder import (
    HEAD_CLASS,
    INPUT_CLASS,
    MODULES_NAME,
    ST_CONFIG_NAME,
    save_head,
    write_folder_atomically,
)
from retrieval_head.io.modelcard import CARD_NAME, write_card
from retrieval_head.version import __version__

if TYPE_CHECKING:
    from retrieval_head.core.model import RetrievalModel


def write_head_folder(
    model: RetrievalModel,
    save_directory: str | Path,
    *,
    repo_id: str | None = None,
    existing_card: str | None = None,
    overwrite_card: bool = False,
    **kwargs: Any,
) -> Path:
    """Atomically write the head's files into `save_directory` (the base is referenced, never copied).

    Files: `config.json` + `retrieval_head.safetensors` (the head), `modules.json` +
    `config_sentence_transformers.json` (so `SentenceTransformer(folder)` loads it) and `README.md` (the card);
    with an encode adapter, `encode_adapter/` (PEFT format, see `encode_adapter.py`).
    A README already in the folder (or `existing_card`) is updated, keeping the text outside our section,
    unless `overwrite_card=True`. `repo_id` names the repo in the card's usage snippets.
    """
    if kwargs:
        raise TypeError(f"save_pretrained() got unexpected keyword arguments: {', '.join(sorted(kwargs))}.")
    state = model.head.state_dict()
    encode_adapter = has_encode_adapter(model)
    if encode_adapter:  # its checksum changes as it trains: record the weights being written
        refresh_record(model)
    target = Path(save_directory)
    if existing_card is None and not overwrite_card and (target / CARD_NAME).is_file():
        existing_card = (target / CARD_NAME).read_text(encoding="utf-8")

    def write(folder: Path) -> None:
        save_head(folder, model.config, state)
        if encode_adapter:
            save_encode_adapter(model, folder / ENCODE_ADAPTER_DIR)
        for name, text in sentence_transformers_files(model.config).items():
            (folder / name).write_text(text, encoding="utf-8")
        write_card(
            folder, model.config, existing=None if overwrite_card else existing_card, repo_id=repo_id,
            num_head_parameters=model.num_head_parameters(),
        )

    return write_folder_atomically(target, write)


def sentence_transformers_files(config: RetrievalHeadConfig) -> dict[str, str]:
    """`modules.json` and `config_sentence_transformers.json` for a head folder (name -> JSON text)."""
    import sentence_transformers
    import torch
    import transformers

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": INPUT_CLASS},
        {"idx": 1, "name": "1", "path": "", "type": HEAD_CLASS},
    ]
    teacher = config.teacher or {}
    st_config = {
        "__version__": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "pytorch": torch.__version__,
            "retrieval_head": __version__,
        },
        "model_type": "SentenceTransformer",
        "prompts": dict(config.prompts or {}),
        "default_prompt_name": None,
        "similarity_fn_name": teacher.get("similarity_fn_name") or "cosine",
    }
    return {
        MODULES_NAME: json.dumps(modules, indent=2) + "\n",
        ST_CONFIG_NAME: json.dumps(st_config, indent=2, sort_keys=True) + "\n",
    }
