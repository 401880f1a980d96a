"""`RetrievalHeadConfig`: the one file of truth for a head (saved as `config.json`)."""

from __future__ import annotations

import json
import logging
from dataclasses import field, fields
from pathlib import Path
from typing import Any, ClassVar

from transformers import PretrainedConfig

from retrieval_head.core.errors import RetrievalHeadError
from retrieval_head.core.quantization import QUANTIZE_TO
from retrieval_head.version import __version__

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
MODEL_TYPE = "retrieval_head"
FEATURE_POOLINGS = ("mean", "last_token")  # weight-free: a cached feature can hold them
POOLINGS = (*FEATURE_POOLINGS, "attention")
HEAD_TYPES = ("linear", "mlp", "transformer")
TEMPLATES = ("chat", "plain")
STATIC_SPANS = ("text", "conversation")


class HeadFolderError(RetrievalHeadError, ValueError):
    """A folder or repo that does not hold a loadable retrieval head."""

# Keys transformers itself writes into every config; they are not "unknown" when we read one back.
_TRANSFORMERS_KEYS = frozenset(
    {"model_type", "transformers_version", "architectures", "dtype", "torch_dtype", "output_hidden_states",
     "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
     "name_or_path", "_name_or_path", "_commit_hash", "output_attentions", "attn_implementation"}
)


class RetrievalHeadConfig(PretrainedConfig):
    """Settings of a retrieval head: which base and layer it reads, how it pools, and what it maps into.

    Like PEFT's `PeftConfig`: a dataclass whose fields carry `help` metadata, validated in `__post_init__`,
    naming the base by id + revision, recording the library version that wrote it. Unlike it, it is a
    transformers config (`model_type="retrieval_head"`) so `AutoConfig`/`AutoModel` can dispatch on it.
    """

    model_type: ClassVar[str] = MODEL_TYPE

    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id (or local path) of the causal LM the head reads."}
    )
    revision: str | None = field(default=None, metadata={"help": "Revision (branch, tag or sha) of the base."})
    base_architecture: str | None = field(
        default=None, metadata={"help": "Class name of the base, e.g. 'LlamaForCausalLM'; checked on attach."}
    )
    base_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the base; filled on attach and checked on load."}
    )
    base_num_layers: int | None = field(default=None, metadata={"help": "Number of hidden layers of the base."})
    base_vocab_size: int | None = field(
        default=None, metadata={"help": "Vocabulary size of the base (rows of the static branch); filled on attach."}
    )
    adapter_name_or_path: str | None = field(
        default=None, metadata={"help": "PEFT adapter on the base the head was trained with, if any."}
    )
    adapter_revision: str | None = field(default=None, metadata={"help": "Revision of that adapter."})
    adapter_checksum: str | None = field(
        default=None,
        metadata={"help": "sha256 of that adapter's weights (bf16-rounded) + scaling; checked on attach."},
    )
    encode_adapter: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "LoRA trained with the head, on only while encoding (r, alpha, target_modules, checksum); "
                          "its weights are in the folder's encode_adapter/. None: the head reads the plain base."},
    )
    layer: int = field(
        default=-1,
        metadata={"help": "Hidden layer the head reads: 0 = embeddings, 1..L = blocks, negative counts from the end."},
    )
    pooling: str = field(
        default="mean",
        metadata={"help": f"How token states of the text are pooled: one of {POOLINGS}. 'attention' (linear / mlp "
                          "heads): a learned softmax over the span's tokens per group of hidden dims (num_attention_"
                          "heads groups), one more for the static branch's ids; it starts as the plain mean."},
    )
    head_type: str = field(default="mlp", metadata={"help": f"Head architecture: one of {HEAD_TYPES}."})
    inner_dim: int = field(default=1024, metadata={"help": "Width of the MLP / transformer head."})
    num_head_layers: int = field(default=1, metadata={"help": "Encoder layers of the 'transformer' head."})
    num_attention_heads: int = field(
        default=8,
        metadata={"help": "Attention heads of the 'transformer' head, or weight groups of 'attention' pooling."},
    )
    static_dim: int = field(
        default=0,
        metadata={"help": "Width of the static (lexical) branch: a learned table over the LM token ids of the text's "
                          "span, mean-pooled (weighted by attention pooling's own softmax with pooling='attention'), "
                          "mapped to output_dim and added before normalising. 0 = none."},
    )
    static_base_embeddings: bool = field(
        default=False,
        metadata={"help": "The static branch also pools the base's own input embeddings of the span's tokens "
                          "(standardised, as hidden_states[0]); read from the base at run time, never stored."},
    )
    static_span: str = field(
        default="text",
        metadata={"help": f"What the static branch pools: one of {STATIC_SPANS}. 'text': the span's ids (for a "
                          "conversation, the last message); 'conversation': the ids of every message's content "
                          "(history + question; the system prompt and the template's tags left out), as the "
                          "teacher reads a dialogue. Plain texts read the same ids either way."},
    )
    dropout: float = field(default=0.1, metadata={"help": "Dropout inside the head while training."})
    output_dim: int = field(default=384, metadata={"help": "Embedding size; must equal the teacher's."})
    normalize: bool = field(default=True, metadata={"help": "L2-normalise the head's output."})
    seed: int = field(default=0, metadata={"help": "Seed of the head's initial weights."})
    query_template: str = field(
        default="chat",
        metadata={"help": "'chat': render inputs with the tokenizer's chat template; 'plain': text as is."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message put before the conversation ('chat' template)."}
    )
    max_length: int = field(default=512, metadata={"help": "Tokens kept per input; history is cut from the left."})
    quantize_to: str | None = field(
        default=None,
        metadata={"help": f"Weight precision of the dense layers at CPU inference, applied when the head loads: one "
                          f"of {QUANTIZE_TO} (float16 reads half the bytes per query and keeps the fp32 "
                          "head's top 10: benchmarks/results/quantization.md); None = fp32. Training, gradients, "
                          "GPUs and save_pretrained always use the fp32 weights."},
    )
    prompts: dict[str, str] = field(
        default_factory=lambda: {"query": "", "document": ""},
        metadata={"help": "Named prompts for `encode(prompt_name=...)`, as in sentence-transformers."},
    )
    teacher: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Fingerprint of the teacher: id, revision, dim, similarity_fn_name, normalized, checksum."},
    )
    probe: dict[str, Any] | None = field(
        default=None, metadata={"help": "Result of the layer/pooling probe that chose `layer` and `pooling`."}
    )
    training: dict[str, Any] | None = field(default=None, metadata={"help": "Recipe the head was trained with."})
    metrics: dict[str, Any] | None = field(
        default=None, metadata={"help": "Measured retrieval quality of the head and of the teacher."}
    )
    library_version: str = field(
        default=__version__, metadata={"help": "Version of retrieval-head that wrote this config."}
    )

    def __post_init__(self, **kwargs: Any) -> None:
        unknown = sorted(k for k in kwargs if k not in _TRANSFORMERS_KEYS)
        if unknown:
            logger.warning(
                "Ignoring config keys unknown to retrieval-head %s (written by version %s): %s. "
                "Upgrade retrieval-head to use them.",
                __version__, self.library_version, ", ".join(unknown),
            )
        known = {k: v for k, v in kwargs.items() if k in _TRANSFORMERS_KEYS}
        super().__post_init__(**known)
        self.validate_fields()

    def validate_fields(self) -> None:
        """Raise `ValueError` naming the field and the allowed values when a setting is invalid."""
        if self.pooling not in POOLINGS:
            raise ValueError(f"RetrievalHeadConfig.pooling={self.pooling!r} is not supported; use one of {POOLINGS}.")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(
                f"RetrievalHeadConfig.head_type={self.head_type!r} is not supported; use one of {HEAD_TYPES}."
            )
        if self.pooling == "attention" and self.head_type == "transformer":
            raise ValueError("RetrievalHeadConfig.pooling='attention' is for 'linear' and 'mlp' heads; a 'transformer' "
                             "head already attends over the span: use pooling='mean' with it.")
        if self.query_template not in TEMPLATES:
            raise ValueError(
                f"RetrievalHeadConfig.query_template={self.query_template!r} is not supported; use one of {TEMPLATES}."
            )
        for name in ("output_dim", "inner_dim", "num_head_layers", "num_attention_heads", "max_length"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"RetrievalHeadConfig.{name} must be a positive integer, got {getattr(self, name)}.")
        if int(self.static_dim) < 0:
            raise ValueError(f"RetrievalHeadConfig.static_dim must be >= 0 (0 = none), got {self.static_dim}.")
        if self.static_base_embeddings and not int(self.static_dim):
            raise ValueError("RetrievalHeadConfig.static_base_embeddings needs a static branch: set static_dim > 0.")
        if self.static_span not in STATIC_SPANS:
            raise ValueError(f"RetrievalHeadConfig.static_span={self.static_span!r} is not supported; use one of "
                             f"{STATIC_SPANS}.")
        if self.quantize_to is not None and self.quantize_to not in QUANTIZE_TO:
            raise ValueError(f"RetrievalHeadConfig.quantize_to={self.quantize_to!r} is not supported; use one of "
                             f"{QUANTIZE_TO} or None (fp32).")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RetrievalHeadConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.base_num_layers is not None:
            self.resolve_layer(self.base_num_layers)
        if self.teacher is not None and self.teacher.get("dim") not in (None, self.output_dim):
            raise ValueError(
                f"RetrievalHeadConfig.output_dim={self.output_dim} differs from the teacher's dim "
                f"{self.teacher['dim']}; set output_dim to the teacher's embedding size."
            )

    def resolve_layer(self, num_layers: int) -> int:
        """Index into `output_hidden_states` (length `num_layers + 1`) for `self.layer`, or raise."""
        index = self.layer if self.layer >= 0 else num_layers + 1 + self.layer
        if not 0 <= index <= num_layers:
            raise ValueError(
                f"RetrievalHeadConfig.layer={self.layer} is out of range for a base with {num_layers} layers; "
                f"use a value in [-{num_layers + 1}, {num_layers}]."
            )
        return index

    @property
    def head_fields(self) -> dict[str, Any]:
        """The fields this class declares (not transformers' generic ones), for display and hashing."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in _OWN_FIELDS}

    def to_json_string(self, use_diff: bool = False) -> str:
        """Sorted, indented JSON of every field (defaults included, so a reader sees the whole head)."""
        data = {"model_type": MODEL_TYPE, **self.head_fields, "architectures": ["RetrievalModel"]}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_file(cls, json_file: str | Path) -> RetrievalHeadConfig:
        """Read a head config, naming the file when it is not valid JSON or not a head config."""
        path = Path(json_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-save the head with save_pretrained().") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a head config object; re-save the head "
                             "with save_pretrained().")
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(
                f"{path} has model_type={data.get('model_type')!r}, expected {MODEL_TYPE!r}: this folder holds "
                "no retrieval head (a plain model or an adapter?). Point to a folder written by save_pretrained()."
            )
        data.pop("model_type")
        data.pop("architectures", None)
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:  # name the file as well as the field
            raise ValueError(f"{path}: {err}") from err


_OWN_FIELDS = frozenset(
    f.name for f in fields(RetrievalHeadConfig) if f.name not in {f2.name for f2 in fields(PretrainedConfig)}
)
