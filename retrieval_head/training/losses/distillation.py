"""`DistillationLoss`: the three parts with recipe weights; refuses non-finite values."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from torch import Tensor, nn

from retrieval_head.training.losses.alignment import AlignmentLoss
from retrieval_head.training.losses.contrastive import ContrastiveLoss
from retrieval_head.training.losses.rank import RankDistillationLoss

LOSS_NAMES: tuple[str, ...] = ("alignment", "contrastive", "rank")
DEFAULT_WEIGHTS: dict[str, float] = {"alignment": 1.0, "contrastive": 0.1, "rank": 0.1}


class DistillationLoss(nn.Module):
    """Weighted sum of :class:`AlignmentLoss`, :class:`ContrastiveLoss` and :class:`RankDistillationLoss`.

    ``total = w_a * alignment + w_c * contrastive + w_r * rank``. A part with weight 0 is not computed at
    all (so its inputs may be omitted). Every computed part is checked: a non-finite value raises
    :class:`FloatingPointError` naming the part, so the trainer can stop with a message.

    Args:
        weights: mapping from ``"alignment"``, ``"contrastive"``, ``"rank"`` to a non-negative weight;
            names left out get weight 0. Default ``{"alignment": 1.0, "contrastive": 0.1, "rank": 0.1}``.
        alignment_kind: ``"cosine"`` or ``"mse"`` (see :class:`AlignmentLoss`).
        contrastive_temperature: temperature of :class:`ContrastiveLoss`.
        rank_temperature: temperature of :class:`RankDistillationLoss`.
        top_k: ``top_k`` of :class:`RankDistillationLoss`.

    Inputs (keyword arguments after the first two):
        student_queries: ``[B, D]`` head query embeddings.
        teacher_queries: ``[B, D]`` teacher embeddings of the same queries.
        candidates: ``[N, D]`` teacher candidates for the contrastive part; ``None`` = use
            ``teacher_queries`` with each query's own teacher embedding as its positive (label-free).
        positives: positives over ``candidates`` (see :func:`positives_to_mask`); ``None`` = diagonal.
        hard_negatives: optional ``[M, D]`` or ``[B, H, D]`` extra negatives for the contrastive part.
        rank_documents: ``[N, D]`` or ``[B, k, D]`` documents for the rank part; ``None`` = ``candidates``.
        top_k_indices: optional ``[B, k]`` indices into ``rank_documents``.

    Returns:
        ``(total, parts)``: ``total`` is a scalar tensor to ``backward()``; ``parts`` maps each computed part
        name (unweighted) and ``"total"`` to a Python float, for logging.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        alignment_kind: Literal["cosine", "mse"] = "cosine",
        contrastive_temperature: float = 0.05,
        rank_temperature: float = 0.05,
        top_k: int = 128,
    ) -> None:
        super().__init__()
        self.weights = self._validate_weights(DEFAULT_WEIGHTS if weights is None else weights)
        self.alignment = AlignmentLoss(alignment_kind)
        self.contrastive = ContrastiveLoss(contrastive_temperature)
        self.rank = RankDistillationLoss(rank_temperature, top_k)

    @staticmethod
    def _validate_weights(weights: Mapping[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"unknown loss name(s) {unknown} in weights; known: {list(LOSS_NAMES)}")
        out: dict[str, float] = {}
        for name in LOSS_NAMES:
            value = weights.get(name, 0.0)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"weight for {name!r} must be a number, got {value!r}") from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"weight for {name!r} must be a finite number >= 0, got {value}")
            out[name] = value
        if not any(out.values()):
            raise ValueError(f"all loss weights are zero ({out}); at least one must be > 0")
        return out

    def forward(
        self,
        student_queries: Tensor,
        teacher_queries: Tensor,
        *,
        candidates: Tensor | None = None,
        positives: Tensor | None = None,
        hard_negatives: Tensor | None = None,
        rank_documents: Tensor | None = None,
        top_k_indices: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        parts: dict[str, Tensor] = {}
        if self.weights["alignment"] > 0:
            parts["alignment"] = self.alignment(student_queries, teacher_queries)
        if self.weights["contrastive"] > 0:
            if candidates is None:
                if positives is not None:
                    raise ValueError("positives were given without candidates for the contrastive loss")
                cands = teacher_queries
            else:
                cands = candidates
            parts["contrastive"] = self.contrastive(student_queries, cands, positives, hard_negatives)
        if self.weights["rank"] > 0:
            docs = rank_documents if rank_documents is not None else candidates
            if docs is None:
                raise ValueError("the rank loss has weight > 0 but no rank_documents (or candidates) given")
            parts["rank"] = self.rank(student_queries, teacher_queries, docs, top_k_indices)

        logged: dict[str, float] = {}
        for name, value in parts.items():
            as_float = float(value.detach())
            if not math.isfinite(as_float):
                raise FloatingPointError(f"the {name} loss is not finite ({as_float})")
            logged[name] = as_float
        terms = [self.weights[name] * value for name, value in parts.items()]
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        logged["total"] = float(total.detach())
        if not math.isfinite(logged["total"]):
            raise FloatingPointError(f"the total loss is not finite ({logged['total']})")
        return total, logged

    def extra_repr(self) -> str:
        return f"weights={self.weights}"
