"""The projection head: token states of one LM layer -> one embedding in the teacher's space."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from retrieval_head.core.config import RetrievalHeadConfig
from retrieval_head.core.pooling import pool
from retrieval_head.core.quantization import HeadQuantizationError, PackedLayers, check_quantize_to, layers_key


class ProjectionHead(nn.Module):
    """Standardise token states, pool them over the text's span, project to `output_dim`.

    `linear` and `mlp` pool first and project the pooled vector; `transformer` (the paper's head) projects
    every token, runs a small encoder over the span, then pools. Every token is standardised with a
    parameter-free LayerNorm, since middle layers of LMs have activations in the hundreds; pooled features
    of `linear`/`mlp` heads therefore depend on no weight and can be cached for training.

    The `linear`/`mlp` path is the agent's whole query-embedding step, so it is kept lean: functional ops on
    the layers' parameters rather than module calls, and the settings it reads are plain attributes copied
    from the config (a `PretrainedConfig` attribute lookup costs ~1 µs, as much as a small op at batch 1).
    Its cost at batch 1 is reading the weights on every call; `quantize("float16" | "int8")` reads 2x / 4x
    fewer bytes (inference on CPU only; the parameters, training and `save_pretrained` stay fp32).

    With `config.static_dim > 0` a static (lexical) branch adds the mean of a learned table's rows over the
    span's LM token ids, mapped to `output_dim`, before normalising: token identity (names, numbers, rare terms)
    that a mean-pooled hidden layer blurs. At query time it is one gather and a mean over ids the LM already has.
    With `config.static_base_embeddings` the branch also pools the base's own input embeddings of those ids
    (`tie_input_embeddings`: a reference to the base's module, not a parameter of the head, never saved).

    With `config.pooling="attention"` a `linear`/`mlp` head pools with learned weights: a softmax over the span's
    tokens of a linear score of each token's state, one per group of hidden dims (`num_attention_heads` groups),
    and, for a static branch over the span, one more that weighs its ids. The scores start at zero, so a fresh head
    pools exactly as `mean` does; such a head reads every span token's state (`token_level`).
    """

    def __init__(self, config: RetrievalHeadConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.head_type, self.pooling, self.normalize = config.head_type, config.pooling, config.normalize
        self.dropout = config.dropout
        self.quantized_to: str | None = None
        self._packed: PackedLayers | None = None
        self._fused: tuple[tuple, torch.Tensor] | None = None  # (parameter key, [W_last | W_static]) at inference
        self._input_embeddings: tuple[nn.Module, ...] = ()  # a tuple: the base's module, not registered here
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        try:
            self._build(config, hidden_size)
        finally:
            torch.random.set_rng_state(generator_state)
        self.register_load_state_dict_post_hook(ProjectionHead._drop_packed)

    @staticmethod
    def _drop_packed(module: nn.Module, incompatible_keys: object) -> None:
        """New weights were loaded: pack (and fuse) them again on the next inference call."""
        module._packed = module._fused = None

    def train(self, mode: bool = True) -> ProjectionHead:
        """Entering or leaving training drops the inference caches (packed and fused weights): an optimizer may
        update the weights in place without bumping their version (torch's fused AdamW does not), so a cache
        keyed by version would serve the weights of an earlier evaluation."""
        if mode or self.training:
            self._packed = self._fused = None
        return super().train(mode)

    def _build(self, config: RetrievalHeadConfig, hidden_size: int) -> None:
        if config.head_type == "linear":
            self.project = nn.Linear(hidden_size, config.output_dim)
            self._dense: tuple[nn.Linear, ...] = (self.project,)  # a tuple: not registered a second time
        elif config.head_type == "mlp":
            self.project = nn.Sequential(
                nn.Linear(hidden_size, config.inner_dim),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.inner_dim, config.output_dim),
            )
            self._dense = (self.project[0], self.project[3])
        else:
            self._dense = ()
            self.token_in = nn.Linear(hidden_size, config.inner_dim)
            layer = nn.TransformerEncoderLayer(
                config.inner_dim, config.num_attention_heads, dim_feedforward=2 * config.inner_dim,
                dropout=config.dropout, batch_first=True, norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(layer, config.num_head_layers, enable_nested_tensor=False)
            self.project = nn.Linear(config.inner_dim, config.output_dim)
        self.static: nn.Embedding | None = None
        if config.static_dim:
            if not config.base_vocab_size:
                raise ValueError("a static branch (static_dim > 0) needs the base's vocabulary size "
                                 "(config.base_vocab_size); attach the head to its base with get_retrieval_model().")
            self.static = nn.Embedding(config.base_vocab_size, config.static_dim)
            nn.init.normal_(self.static.weight, std=0.02)
            width = config.static_dim + (hidden_size if config.static_base_embeddings else 0)
            self.static_out = nn.Linear(width, config.output_dim, bias=False)
            nn.init.zeros_(self.static_out.weight)  # a fresh branch adds nothing: training starts from the MLP
        self.attend: nn.Linear | None = None
        if config.pooling == "attention":
            weighs_ids = bool(config.static_dim) and config.static_span == "text"
            self.attend = nn.Linear(hidden_size, config.num_attention_heads + int(weighs_ids))
            nn.init.zeros_(self.attend.weight)  # uniform weights: a fresh head pools as the mean does
            nn.init.zeros_(self.attend.bias)

    @property
    def uses_ids(self) -> bool:
        """Whether the head reads the span's token ids (a static branch) besides its states."""
        return self.static is not None

    @staticmethod
    def span_ids(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The static branch's input: `input_ids` [B, T] where the span `mask` is set, -1 elsewhere."""
        return torch.where(mask.bool(), input_ids.to(mask.device), -1)

    def tie_input_embeddings(self, embeddings: nn.Module) -> None:
        """Give the static branch the base's input-embedding module (`base.get_input_embeddings()`) to read."""
        self._input_embeddings = (embeddings,)

    def static_pool(self, span_ids: torch.Tensor, padded: bool | None = None,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
        """The static branch's pooled input: mean over each row's ids (-1 = padding) of the table's rows,
        followed, with `static_base_embeddings`, by the mean of the base's standardised input embeddings.
        `padded=False` says that no id is -1 (the check is then skipped); None: look. `weights` [B, L] (attention
        pooling's, zero on padding) replace the mean by a weighted sum."""
        if weights is not None:
            return self._weighted_static_pool(span_ids, weights)
        if padded is None:
            padded = not span_ids.numel() or int(span_ids.min()) < 0
        if not (self.config.static_base_embeddings or padded):
            return F.embedding(span_ids, self.static.weight).mean(1)  # no padding (the agent's batch of one)
        valid = span_ids >= 0
        counts = valid.sum(1)  # -1 padded rows: the valid ids, flat, with each row's offset (empty rows pool to 0)
        pooled = F.embedding_bag(span_ids[valid], self.static.weight, counts.cumsum(0) - counts, mode="mean")
        if not self.config.static_base_embeddings:
            return pooled
        weights = valid / counts.view(-1, 1).clamp_min(1)
        return torch.cat([pooled, self._base_embedding_view(span_ids.clamp_min(0), weights)], dim=-1)

    def _base_embedding_view(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The weighted sum ([B, H]) over ids [B, L] (no -1) of the base's standardised input embeddings."""
        if not self._input_embeddings:
            raise ValueError("this head's static branch reads the base's input embeddings "
                             "(static_base_embeddings): attach it to its base with get_retrieval_model(), or call "
                             "head.tie_input_embeddings(base.get_input_embeddings()).")
        embeddings = self._input_embeddings[0]
        with torch.no_grad():
            vectors = embeddings(ids.to(embeddings.weight.device)).to(weights.device).float()
        vectors = F.layer_norm(vectors, vectors.shape[-1:])
        return (vectors * weights.unsqueeze(-1)).sum(1)

    def _weighted_static_pool(self, span_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if span_ids.shape != weights.shape:
            raise ValueError(f"the static branch's ids {tuple(span_ids.shape)} are not the span's tokens "
                             f"{tuple(weights.shape)} that attention pooling weighs; give the span's ids "
                             "(input_ids with the span mask), not other static ids.")
        ids = span_ids.clamp_min(0)  # padding (-1) has weight 0
        pooled = F.embedding_bag(ids, self.static.weight, mode="sum", per_sample_weights=weights.contiguous())
        if not self.config.static_base_embeddings:
            return pooled
        return torch.cat([pooled, self._base_embedding_view(ids, weights)], dim=-1)

    @property
    def token_level(self) -> bool:
        """Whether the head needs every token's state (transformer, attention pooling) rather than a pooled vector."""
        return self.head_type == "transformer" or self.attend is not None

    def attention_pool(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention pooling of standardised states [B, T, H] over the span `mask` [B, T]: (pooled [B, H], the
        static branch's weights [B, T] or None). Each group of hidden dims has its own softmax over the span."""
        scores = F.linear(states, self.attend.weight, self.attend.bias)
        if mask.device.type == "cpu" and not torch.is_grad_enabled() and bool(mask.all()):
            weights = scores.softmax(1)  # a span over every column (the agent's batch of one): no masking
        else:
            valid = mask.bool().unsqueeze(-1)
            weights = torch.softmax(scores.masked_fill(~valid, torch.finfo(scores.dtype).min), dim=1) * valid
        groups = self.config.num_attention_heads
        rows, length, hidden = states.shape
        if hidden % groups == 0:
            grouped = states.view(rows, length, groups, hidden // groups) * weights[..., :groups, None]
            pooled = grouped.sum(1).view(rows, hidden)
        else:
            group_of_dim = torch.arange(hidden, device=states.device) * groups // hidden
            pooled = (states * weights[..., group_of_dim]).sum(1)
        return pooled, (weights[..., groups] if weights.shape[-1] > groups else None)

    def features(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weight-free input of the head: standardised states, pooled unless the head is token-level."""
        states = F.layer_norm(states.float(), states.shape[-1:])
        return states if self.token_level else pool(states, mask, self.pooling)

    def project_features(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                         span_ids: torch.Tensor | None = None, ids_padded: bool | None = None) -> torch.Tensor:
        """Map `features()` output (and, for a static branch, `span_ids` [B, L], -1 padded) to embeddings
        (L2-normalised when the config says so). `ids_padded=False` says that no span id is -1."""
        static_weights = None
        if self.attend is not None:
            features, static_weights = self.attention_pool(features, mask)
        if self.head_type == "transformer":
            tokens = self.encoder(self.token_in(features), src_key_padding_mask=~mask.bool())
            out = self.project(pool(tokens, mask, self.pooling))
        elif self.static is not None and span_ids is not None and self._fuses(features):
            static = self.static_pool(span_ids.to(features.device), ids_padded, static_weights)
            return self._normalized(self._fused_static(features, static))
        else:
            packed = self._packed_layers(features) if self.quantized_to else None
            if packed is not None:
                out = packed(features)
            else:
                out = features
                for i, layer in enumerate(self._dense):
                    if i:  # between the MLP's two layers
                        out = F.gelu(out)
                        if self.training:
                            out = F.dropout(out, self.dropout, training=True)
                    out = F.linear(out, layer.weight, layer.bias)
        if self.static is not None:
            if span_ids is None:
                raise ValueError("this head has a static branch (static_dim > 0): it needs the span's token ids; "
                                 "call head(states, mask, input_ids) or RetrievalModel.embed_hidden_states(..., "
                                 "input_ids=...)")
            static = self.static_pool(span_ids.to(out.device), ids_padded, static_weights)
            out = out + F.linear(static, self.static_out.weight)
        return self._normalized(out)

    def _normalized(self, out: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return out
        norm = torch.linalg.vector_norm(out, dim=-1, keepdim=True)
        if out.requires_grad:
            return out / norm.clamp_min(1e-12)  # = F.normalize, leaner
        return out.div_(norm.clamp_min_(1e-12))  # inference: in place

    def _fuses(self, features: torch.Tensor) -> bool:
        """Inference with fp32 weights on the CPU: the static branch's map joins the last dense layer."""
        return not (self.training or self.quantized_to or torch.is_grad_enabled() or features.device.type != "cpu")

    def _fused_static(self, features: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """The dense layers and the static map as one product at the end: `[W_last | W_static] @ [h; static]`
        (the same sum, one op fewer at batch 1, where dispatch is most of the time)."""
        last, static_out = self._dense[-1], self.static_out
        key = tuple((w.data_ptr(), -1 if w.is_inference() else w._version) for w in (last.weight, static_out.weight))
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, torch.cat([last.weight.detach(), static_out.weight.detach()], dim=1).contiguous())
        out = features
        for layer in self._dense[:-1]:
            out = F.gelu(F.linear(out, layer.weight, layer.bias))
        return F.linear(torch.cat([out, static], dim=-1), self._fused[1], last.bias)

    def quantize(self, dtype: str | None = "float16") -> ProjectionHead:
        """Run inference with the dense layers' weights in `dtype` ("float16" or "int8"); None: fp32 again.

        See `retrieval_head.core.quantization` for the kernels and their accuracy. The fp32 parameters are kept:
        training, calls that need gradients and inputs on another device use them, weights that change are
        packed again, and `save_pretrained` writes them unchanged.
        """
        if dtype is None:
            self.quantized_to, self._packed = None, None
            return self
        check_quantize_to(dtype)
        if self.head_type == "transformer":
            raise HeadQuantizationError("quantize() supports 'linear' and 'mlp' heads; this head is 'transformer' "
                                        "(its encoder runs in fp32). Leave it unquantized.")
        device = self._dense[0].weight.device
        if device.type != "cpu":
            raise HeadQuantizationError(f"quantize({dtype!r}) runs on the CPU, but the head is on {device}; on a GPU "
                                        "the fp32 head is already fast: leave it unquantized.")
        previous, self.quantized_to, self._packed = (self.quantized_to, self._packed), dtype, None
        try:
            self._pack()
        except (RuntimeError, AttributeError) as error:  # a torch built without (or dropping) these kernels
            self.quantized_to, self._packed = previous
            raise HeadQuantizationError(f"this torch build cannot run {dtype} head weights on the CPU ({error}); "
                                        "use another quantize_to or the fp32 head (None).") from error
        return self

    def _packed_layers(self, features: torch.Tensor) -> PackedLayers | None:
        """The packed dense layers, or None where the fp32 path runs: training, gradients wanted, or inputs off
        the CPU."""
        if self.training or torch.is_grad_enabled() or features.device.type != "cpu":
            return None
        return self._pack()

    def _pack(self) -> PackedLayers:
        """The dense layers packed for `quantized_to`, packed again when a parameter changed."""
        if self._packed is None or self._packed.key != layers_key(self._dense):
            self._packed = PackedLayers(self._dense, self.quantized_to)
        return self._packed

    def forward(self, states: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor | None = None,
                static_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings [B, output_dim] (fp32) for token states [B, T, H] and a span mask [B, T] (and the token ids
        [B, T] of those positions, which a static branch reads). `static_ids` [B, L] (-1 padded) give the static
        branch other ids than the span's: a conversation-wide branch reads the whole dialogue's."""
        if self.token_level or self.pooling != "mean" or mask.device.type != "cpu" or not bool(mask.all()):
            if static_ids is None and input_ids is not None and self.static is not None:
                static_ids = self.span_ids(input_ids, mask)
            return self.project_features(self.features(states, mask), mask, static_ids)
        # The span is every column (the agent passes states cut to it): a plain mean, and the ids as they are.
        features = F.layer_norm(states.float(), states.shape[-1:]).mean(1)
        if static_ids is None and input_ids is not None and self.static is not None:
            return self.project_features(features, mask, input_ids, ids_padded=False)
        return self.project_features(features, mask, static_ids)
