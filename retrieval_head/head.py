"""The projection head: token states of one LM layer -> one embedding in the teacher's space."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import RetrievalHeadConfig
from .pooling import pool


class ProjectionHead(nn.Module):
    """Standardise token states, pool them over the text's span, project to `output_dim`.

    `linear` and `mlp` pool first and project the pooled vector; `transformer` (the paper's head) projects
    every token, runs a small encoder over the span, then pools. Every token is standardised with a
    parameter-free LayerNorm, since middle layers of LMs have activations in the hundreds; pooled features
    of `linear`/`mlp` heads therefore depend on no weight and can be cached for training.

    The `linear`/`mlp` path is the agent's whole query-embedding step, so it is kept lean: functional ops on
    the layers' parameters rather than module calls, and the settings it reads are plain attributes copied
    from the config (a `PretrainedConfig` attribute lookup costs ~1 µs, as much as a small op at batch 1).
    """

    def __init__(self, config: RetrievalHeadConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.head_type, self.pooling, self.normalize = config.head_type, config.pooling, config.normalize
        self.dropout = config.dropout
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(config.seed)
        try:
            self._build(config, hidden_size)
        finally:
            torch.random.set_rng_state(generator_state)

    def _build(self, config: RetrievalHeadConfig, hidden_size: int) -> None:
        if config.head_type == "linear":
            self.project = nn.Linear(hidden_size, config.output_dim)
        elif config.head_type == "mlp":
            self.project = nn.Sequential(
                nn.Linear(hidden_size, config.inner_dim),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.inner_dim, config.output_dim),
            )
        else:
            self.token_in = nn.Linear(hidden_size, config.inner_dim)
            layer = nn.TransformerEncoderLayer(
                config.inner_dim, config.num_attention_heads, dim_feedforward=2 * config.inner_dim,
                dropout=config.dropout, batch_first=True, norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(layer, config.num_head_layers, enable_nested_tensor=False)
            self.project = nn.Linear(config.inner_dim, config.output_dim)

    @property
    def token_level(self) -> bool:
        """Whether the head needs every token's state (transformer) rather than a pooled vector."""
        return self.head_type == "transformer"

    def features(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weight-free input of the head: standardised states, pooled unless the head is token-level."""
        states = F.layer_norm(states.float(), states.shape[-1:])
        return states if self.token_level else pool(states, mask, self.pooling)

    def project_features(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Map `features()` output to embeddings (L2-normalised when the config says so)."""
        if self.head_type == "mlp":
            first, _, _, last = self.project
            hidden = F.gelu(F.linear(features, first.weight, first.bias))
            if self.training:
                hidden = F.dropout(hidden, self.dropout, training=True)
            out = F.linear(hidden, last.weight, last.bias)
        elif self.head_type == "linear":
            out = F.linear(features, self.project.weight, self.project.bias)
        else:
            tokens = self.encoder(self.token_in(features), src_key_padding_mask=~mask.bool())
            out = self.project(pool(tokens, mask, self.pooling))
        return F.normalize(out, dim=-1) if self.normalize else out

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embeddings [B, output_dim] (fp32) for token states [B, T, H] and a span mask [B, T]."""
        return self.project_features(self.features(states, mask), mask)
