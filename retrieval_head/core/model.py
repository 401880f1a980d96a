"""`RetrievalModel`: a frozen causal LM plus a trainable head that gives it `encode()`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import PushToHubMixin

from retrieval_head.core.base import base_of, check_base, describe_base
from retrieval_head.core.config import RetrievalHeadConfig
from retrieval_head.core.encode import encode
from retrieval_head.core.head import ProjectionHead
from retrieval_head.core.layer_states import hidden_states_at
from retrieval_head.core.templates import EncodeInput, QueryRenderer, RenderedInput, context_length

logger = logging.getLogger(__name__)


class RetrievalModel(nn.Module, PushToHubMixin):
    """A causal LM (frozen, generation unchanged) with a projection head into a teacher's embedding space."""

    config_class = RetrievalHeadConfig
    base_model_prefix = "retrieval_head"

    def __init__(
        self, base_model: nn.Module, config: RetrievalHeadConfig, tokenizer: Any = None, allow_merged: bool = False
    ) -> None:
        super().__init__()
        from retrieval_head.adapters.recorded import check_adapter, record_adapter  # PEFT interop, above the core

        fresh = config.base_architecture is None  # never attached: record the base and adapter it meets now
        check_base(config, base_model)
        check_adapter(config, base_model, allow_merged=allow_merged)
        for key, value in describe_base(base_model).items():
            if getattr(config, key) is None:
                setattr(config, key, value)
        if fresh:
            record_adapter(config, base_model, allow_merged=allow_merged)
        config.validate_fields()
        if tokenizer is not None and config.query_template == "chat" and not getattr(tokenizer, "chat_template", None):
            logger.warning("The tokenizer has no chat template; the head renders inputs as plain text.")
            config.query_template = "plain"
        self.config = config
        self.base_model = base_model
        self.base_model.requires_grad_(False)
        self.base_model.eval()
        self.tokenizer = tokenizer
        self.layer_index = config.resolve_layer(config.base_num_layers)
        self.head = ProjectionHead(config, config.base_hidden_size).to(self._base_device())
        self.head.tie_input_embeddings(base_model.get_input_embeddings())
        self.train(False)  # inference by default: head in eval mode, as encode() expects

    # --- devices and dtypes -------------------------------------------------------------------------
    def _base_device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def device(self) -> torch.device:
        return self._base_device()

    @property
    def dtype(self) -> torch.dtype:
        """The base's precision (the head stays fp32)."""
        return next(self.base_model.parameters()).dtype

    def train(self, mode: bool = True) -> RetrievalModel:
        """Only the head trains; the base stays in eval mode so its outputs (and generation) don't change."""
        self.training = mode
        self.head.train(mode)
        self.base_model.eval()
        return self

    # --- the seams --------------------------------------------------------------------------------
    @property
    def renderer(self) -> QueryRenderer:
        if self.tokenizer is None:
            raise ValueError("This RetrievalModel has no tokenizer; pass tokenizer= to get_retrieval_model().")
        return QueryRenderer(self.tokenizer, self.config, context_length=context_length(base_of(self.base_model)))

    def layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Hidden states of the head's layer for tokenized input (one pass of the frozen base).

        With an encode adapter (`config.encode_adapter`), this is the one place it is switched on.
        """
        from retrieval_head.adapters.encode_adapter import encode_adapter_on  # PEFT interop, above the core

        with encode_adapter_on(self):
            return hidden_states_at(base_of(self.base_model), [self.layer_index], input_ids, attention_mask,
                                    **kwargs)[self.layer_index]

    def embed_hidden_states(self, hidden_states: torch.Tensor, span_mask: torch.Tensor,
                            input_ids: torch.Tensor | None = None, static_mask: torch.Tensor | None = None,
                            static_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings from states the base already computed ([B, T, H] at the head's layer) over a span mask.

        `input_ids` [B, T] are the token ids at those positions: a head with a static branch reads them, over
        `static_mask` [B, T] where given (a conversation-wide branch: `renderer.collate` makes it), else over the
        span; or give the branch's ids directly as `static_ids` [B, L] (-1 padded).
        With an encode adapter the states must be computed with it on (`layer_states`), not by `generate`.
        """
        if span_mask.shape != hidden_states.shape[:2]:
            raise ValueError(f"span_mask {tuple(span_mask.shape)} does not match states {tuple(hidden_states.shape)}.")
        if not bool(span_mask.any(dim=1).all()):
            raise ValueError("An input has an empty span: there are no tokens to pool. Give a non-empty span.")
        if input_ids is not None and input_ids.shape != span_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} does not match span_mask {tuple(span_mask.shape)}.")
        if input_ids is not None:
            input_ids = input_ids.to(self.head_device)
            if static_mask is not None and static_ids is None and self.head.uses_ids:
                if static_mask.shape != input_ids.shape:
                    raise ValueError(f"static_mask {tuple(static_mask.shape)} does not match input_ids "
                                     f"{tuple(input_ids.shape)}.")
                static_ids = self.head.span_ids(input_ids, static_mask.to(self.head_device))
        if static_ids is not None:
            static_ids = static_ids.to(self.head_device)
        return self.head(hidden_states.to(self.head_device), span_mask.to(self.head_device), input_ids, static_ids)

    def static_ids_of(self, rendered: Sequence[RenderedInput]) -> torch.Tensor | None:
        """The static branch's ids ([B, L], -1 padded) of rendered inputs whose states were computed elsewhere
        (the agent's prefill), when the head pools the whole conversation; None: the branch reads the span's."""
        if not self.head.uses_ids or self.config.static_span != "conversation":
            return None
        rows = [r.static_ids() for r in rendered]
        out = torch.full((len(rows), max([len(r) for r in rows] + [1])), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out.to(self.head_device)

    @property
    def head_device(self) -> torch.device:
        return next(self.head.parameters()).device

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, span_mask: torch.Tensor | None = None,
        static_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embeddings [B, output_dim] for tokenized input; the span defaults to every attended token (the
        static branch's `static_mask`, from `renderer.collate`, to the span)."""
        states = self.layer_states(input_ids, attention_mask)
        return self.embed_hidden_states(states, attention_mask if span_mask is None else span_mask, input_ids,
                                        static_mask)

    def embed(self, items: Sequence[EncodeInput], prompt: str = "") -> torch.Tensor:
        """Embeddings for a batch of texts or conversations, rendered with the head's template."""
        renderer = self.renderer
        batch = renderer.collate([renderer.render(item, prompt) for item in items], device=self.device)
        return self.forward(**batch)

    # --- sentence-transformers API ------------------------------------------------------------------
    def encode(self, inputs: EncodeInput | Sequence[EncodeInput], **kwargs: Any) -> np.ndarray | torch.Tensor:
        """Embed texts or conversations like `SentenceTransformer.encode`.

        A string (or one conversation) gives a 1-D result, a list a 2-D one; see `retrieval_head.core.encode.encode`
        for the arguments (`prompt_name`, `prompt`, `batch_size`, `show_progress_bar`, `precision`,
        `convert_to_numpy`, `convert_to_tensor`, `device`, `normalize_embeddings`, `truncate_dim`).
        """
        was_training = self.training
        self.eval()
        try:
            return encode(self, inputs, **kwargs)
        finally:
            self.train(was_training)

    def encode_query(self, inputs: EncodeInput | Sequence[EncodeInput], **kwargs: Any) -> np.ndarray | torch.Tensor:
        """`encode` with the `query` prompt, as in sentence-transformers."""
        if "query" in (self.config.prompts or {}) and kwargs.get("prompt") is None \
                and kwargs.get("prompt_name") is None:  # None = not given, as sentence-transformers' evaluators pass
            kwargs["prompt_name"] = "query"
        return self.encode(inputs, **kwargs)

    def encode_document(
        self, inputs: EncodeInput | Sequence[EncodeInput], **kwargs: Any
    ) -> np.ndarray | torch.Tensor:
        """`encode` with the `document` prompt. Documents are usually embedded by the teacher instead."""
        if "document" in (self.config.prompts or {}) and kwargs.get("prompt") is None \
                and kwargs.get("prompt_name") is None:  # None = not given, as sentence-transformers' evaluators pass
            kwargs["prompt_name"] = "document"
        return self.encode(inputs, **kwargs)

    def get_sentence_embedding_dimension(self) -> int:
        return self.config.output_dim

    @property
    def similarity_fn_name(self) -> str:
        """The teacher's similarity function ("cosine", "dot", ...): sentence-transformers' evaluators read it."""
        return (self.config.teacher or {}).get("similarity_fn_name") or "cosine"

    @property
    def max_seq_length(self) -> int:
        """Tokens read per input (`config.max_length`; history is cut from the left)."""
        return self.config.max_length

    def get_max_seq_length(self) -> int:
        return self.max_seq_length

    @property
    def model_card_data(self) -> EvaluationLog:
        """Where sentence-transformers' evaluators store their metrics (`eval_results_dict`)."""
        if "_model_card_data" not in self.__dict__:
            self.__dict__["_model_card_data"] = EvaluationLog()
        return self.__dict__["_model_card_data"]

    def similarity(self, a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Similarity matrix under the teacher's function (`similarity_fn_name`), as SentenceTransformer's."""
        from sentence_transformers import SimilarityFunction

        return SimilarityFunction.to_similarity_fn(self.similarity_fn_name)(_float(a), _float(b))

    def similarity_pairwise(self, a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Row-by-row similarity under the teacher's function, as `SentenceTransformer.similarity_pairwise`."""
        from sentence_transformers import SimilarityFunction

        return SimilarityFunction.to_similarity_pairwise_fn(self.similarity_fn_name)(_float(a), _float(b))

    # --- generation is the base's -------------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's `generate`, untouched (an encode adapter, if any, is disabled)."""
        from retrieval_head.adapters.encode_adapter import encode_adapter_off  # PEFT interop, above the core

        with encode_adapter_off(self):
            return self.base_model.generate(*args, **kwargs)

    # --- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> Path:
        """Write the head (config.json + safetensors, head weights only) atomically; the base is referenced."""
        from retrieval_head.io.save import write_head_folder

        return write_head_folder(self, save_directory, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        exist_ok: bool = True,
        overwrite_card: bool = False,
    ) -> Any:
        """Upload the head's files (config, safetensors, sentence-transformers files, card) in one commit.

        Overrides `PushToHubMixin.push_to_hub`, which would replace our rendered card with the repo's README
        (or transformers' blank template). Here an existing README keeps its text outside our section unless
        `overwrite_card=True`. Returns the `huggingface_hub.CommitInfo` (a str: the commit URL).
        """
        from retrieval_head.io.hub import push_head

        return push_head(
            self, repo_id, commit_message=commit_message, commit_description=commit_description, private=private,
            token=token, revision=revision, create_pr=create_pr, exist_ok=exist_ok, overwrite_card=overwrite_card,
        )

    @classmethod
    def from_pretrained(
        cls,
        head_name_or_path: str | Path,
        base_model: nn.Module | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> RetrievalModel:
        """Load a head from a folder or a Hub repo, with the base named in its config (or the one given)."""
        from retrieval_head.io.load import load_retrieval_model

        return load_retrieval_model(cls, head_name_or_path, base_model=base_model, tokenizer=tokenizer, **kwargs)

    def quantize_head(self, dtype: str | None = "float16") -> RetrievalModel:
        """Embed with the head's dense weights in `dtype` ("float16" or "int8") on the CPU; None: fp32 again.

        Halves / quarters the bytes the head reads per query (the cost of the agent's embedding step at batch
        1); the fp32 weights stay for training and saving. See `ProjectionHead.quantize`.
        """
        self.head.quantize(dtype)
        return self

    def num_head_parameters(self) -> int:
        return sum(p.numel() for p in self.head.parameters())


def _float(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


class EvaluationLog:
    """The part of sentence-transformers' model-card data its evaluators write to: metrics per evaluator."""

    def __init__(self) -> None:
        self.eval_results_dict: dict[Any, dict[str, Any]] = {}
        self.training_logs: list[dict[str, Any]] = []

    def set_evaluation_metrics(self, evaluator: Any, metrics: dict[str, Any], epoch: int = 0, step: int = 0) -> None:
        self.eval_results_dict[evaluator] = dict(metrics)


def get_retrieval_model(
    model: nn.Module, config: RetrievalHeadConfig, tokenizer: Any = None, allow_merged: bool = False
) -> RetrievalModel:
    """Attach a fresh head to a causal LM (like `peft.get_peft_model`)."""
    return RetrievalModel(model, config, tokenizer=tokenizer, allow_merged=allow_merged)
