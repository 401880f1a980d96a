"""sentence-transformers modules that load a saved head folder or Hub repo as a `SentenceTransformer`.

A head folder carries `modules.json` naming two classes of this (installed) package:

- `RetrievalHeadInput` (an `InputModule`): loads the base LM by id + revision (the packaged copy for the
  embedded ids, so offline) and renders/tokenizes texts and conversations with the head's template, exactly as
  `RetrievalModel.encode` does; its forward runs the frozen base and hands on the states of the head's layer.
- `RetrievalHeadPooling` (a `Module`): the trained `ProjectionHead` (span pooling + projection + L2 norm).

Both read the head's own files (`config.json`, `retrieval_head.safetensors`) from the folder root: there is
no second copy of the config. Since sentence-transformers 6.0 a class outside `sentence_transformers.*` is only
imported with `trust_remote_code=True`; `load_sentence_transformer()` loads without it by handing these two
(already imported) classes to sentence-transformers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

try:  # sentence-transformers >= 6
    from sentence_transformers.base.modules import InputModule, Module
except ImportError:  # pragma: no cover - sentence-transformers 5.x
    from sentence_transformers.models import InputModule, Module

from retrieval_head.adapters.encode_adapter import encode_adapter_on, load_encode_adapter
from retrieval_head.core.config import RetrievalHeadConfig
from retrieval_head.core.head import ProjectionHead
from retrieval_head.core.layer_states import hidden_states_at
from retrieval_head.core.templates import QueryRenderer, check_inputs, context_length
from retrieval_head.io.folder import (
    HEAD_CLASS,
    INPUT_CLASS,
    SAVED_MODULE,
    check_weights,
    read_config,
    read_weights,
    save_head,
)
from retrieval_head.io.load import config_quantizes


def _head_folder(
    model_name_or_path: str,
    token: bool | str | None = None,
    cache_folder: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Path:
    from retrieval_head.io.load import resolve_head_folder

    return resolve_head_folder(
        model_name_or_path, revision=revision, token=token, cache_dir=cache_folder, local_files_only=local_files_only
    )


class RetrievalHeadInput(InputModule):
    """Input module: the frozen base LM and the head's template. Output: the states of the head's layer."""

    save_in_root = True

    def __init__(self, config: RetrievalHeadConfig, base_model: torch.nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.config = config
        self.auto_model = base_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.renderer = QueryRenderer(tokenizer, config, context_length=context_length(base_model))
        self.layer_index = config.resolve_layer(config.base_num_layers)
        self.max_seq_length = config.max_length

    @property
    def base_model(self) -> torch.nn.Module:
        """The base LM, under the name `RetrievalModel` gives it (the encode-adapter helpers read it)."""
        return self.auto_model

    @property
    def modalities(self) -> list[str]:
        return ["text", "message"]

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Render and tokenize texts or conversations as `RetrievalModel.encode` does (prompt before the text).

        `task` (which `encode_query` / `encode_document` pass) selects nothing here: the prompt carries the role.
        """
        items = list(inputs)
        check_inputs(items)
        return self.renderer.collate([self.renderer.render(item, prompt or "") for item in items])

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        with encode_adapter_on(self):  # a head trained with an encode adapter reads the adapted states
            states = hidden_states_at(self.auto_model, [self.layer_index], features["input_ids"],
                                      features["attention_mask"])
        features["token_embeddings"] = states[self.layer_index]
        if self.config.static_base_embeddings:  # the head's static branch reads the base's input embeddings
            features["input_embeddings_module"] = self.auto_model.get_input_embeddings()
        return features

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """The head's config.json (the base is referenced by id + revision, never saved)."""
        Path(output_path, "config.json").write_text(self.config.to_json_string(), encoding="utf-8")

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> RetrievalHeadInput:
        from retrieval_head.adapters.recorded import attach_recorded_adapter
        from retrieval_head.io.embedded import is_embedded, load_base

        folder = _head_folder(model_name_or_path, token, cache_folder, revision, local_files_only)
        config = read_config(folder)
        if not config.base_model_name_or_path:
            raise ValueError(f"{folder} names no base model (base_model_name_or_path); re-save the head.")
        base_kwargs: dict[str, Any] = dict(model_kwargs or {})
        if not is_embedded(config.base_model_name_or_path) and not Path(config.base_model_name_or_path).is_dir():
            base_kwargs.update(token=token, local_files_only=local_files_only)
            if cache_folder is not None:
                base_kwargs["cache_dir"] = cache_folder
        base_model, tokenizer = load_base(config.base_model_name_or_path, config.revision, **base_kwargs)
        module = cls(config, attach_recorded_adapter(base_model, config), tokenizer)
        if config.encode_adapter:  # restored as RetrievalModel.from_pretrained does, from the folder's subfolder
            load_encode_adapter(module, folder)
        return module


class RetrievalHeadPooling(Module):
    """The trained projection head: span-pooled layer states -> `sentence_embedding` in the teacher's space."""

    save_in_root = True

    def __init__(self, config: RetrievalHeadConfig, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.config = config
        self.head = ProjectionHead(config, config.base_hidden_size)
        if state_dict is not None:
            check_weights(self.head, state_dict, "the head folder")
            self.head.load_state_dict(state_dict)
        self.head.eval()
        if config_quantizes(self.head):  # the config's inference precision, as RetrievalModel.from_pretrained
            self.head.quantize(config.quantize_to)

    def forward(self, features: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        states = features["token_embeddings"]
        device = next(self.head.parameters()).device
        ids = features.get("input_ids") if self.head.uses_ids else None
        embeddings = features.pop("input_embeddings_module", None)
        if embeddings is not None:
            self.head.tie_input_embeddings(embeddings)
        static_mask = features.get("static_mask") if ids is not None else None
        static_ids = None if static_mask is None else self.head.span_ids(ids.to(device), static_mask.to(device))
        features["sentence_embedding"] = self.head(states.to(device), features["span_mask"].to(device),
                                                   None if ids is None else ids.to(device), static_ids)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.config.output_dim

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """config.json + retrieval_head.safetensors in the model's root, as `RetrievalModel.save_pretrained` does.

        `SentenceTransformer.save` hands every module after the first its own `{idx}_{ClassName}` folder; the
        head's files still go to the root (that folder stays empty), so the result also loads with
        `RetrievalModel.from_pretrained` and there is one config, not two.
        """
        path = Path(output_path)
        root = path.parent if re.fullmatch(rf"\d+_{type(self).__name__}", path.name) else path
        save_head(root, self.config, self.head.state_dict())

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> RetrievalHeadPooling:
        # The head's files live in the root whatever `subfolder` modules.json gives (see `save`).
        folder = _head_folder(model_name_or_path, token, cache_folder, revision, local_files_only)
        return cls(read_config(folder), read_weights(folder))


# sentence-transformers' `save()` names a module by its class's `__module__`: keep the stable path saved folders use
RetrievalHeadInput.__module__ = RetrievalHeadPooling.__module__ = SAVED_MODULE


def load_sentence_transformer(model_name_or_path: str | Path, **kwargs: Any) -> Any:
    """`SentenceTransformer(model_name_or_path, **kwargs)` for a head, without `trust_remote_code`.

    sentence-transformers >= 6 refuses to import module classes outside its own namespace unless
    `trust_remote_code=True`, which would also allow code *from the repo*. Here only this package's two classes
    (already imported) are supplied; any other class a repo names still goes through that gate.
    """
    from sentence_transformers import SentenceTransformer

    classes = {INPUT_CLASS: RetrievalHeadInput, HEAD_CLASS: RetrievalHeadPooling}
    loader = getattr(SentenceTransformer, "_load_with_module_classes", None)
    if loader is None:  # sentence-transformers 5.x imports classes of installed packages without the flag
        return SentenceTransformer(str(model_name_or_path), **kwargs)
    return loader(str(model_name_or_path), classes, **kwargs)
