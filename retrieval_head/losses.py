"""Training losses for distilling a sentence-transformers teacher into a retrieval head.

Every loss is a small :class:`torch.nn.Module` that works on embedding tensors, not on models, so the
trainer can feed cached teacher embeddings and cached hidden states alike. Conventions shared by all:

* ``student_*`` tensors come from the head and carry gradients;
* ``teacher_*`` tensors and document embeddings come from the teacher and are **detached** inside the
  losses, so gradients only ever reach the student;
* similarities are cosine similarities, computed in float32 (safe under bf16/fp16 autocast);
* a temperature ``T`` divides the similarities before a softmax (``T=0.05`` is a scale of 20, the
  sentence-transformers default for ``MultipleNegativesRankingLoss``).

:class:`DistillationLoss` combines the three parts with recipe weights and refuses non-finite values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSS_NAMES: tuple[str, ...] = ("alignment", "contrastive", "rank")
DEFAULT_WEIGHTS: dict[str, float] = {"alignment": 1.0, "contrastive": 0.1, "rank": 0.1}


def _check_2d(name: str, tensor: Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, dim], got shape {tuple(tensor.shape)}")


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def _zero_keeping_graph(tensor: Tensor) -> Tensor:
    """A scalar zero that is still connected to ``tensor``'s graph (so ``backward()`` works)."""
    return tensor.sum() * 0.0


class AlignmentLoss(nn.Module):
    """Pulls the head's query embeddings onto the teacher's query embeddings.

    ``kind="cosine"``: mean over the batch of ``1 - cos(student_i, teacher_i)`` (in [0, 2]).
    ``kind="mse"``: mean squared error over all elements (``F.mse_loss``).

    Needs no labels: any text the teacher embeds is a training example.

    Args:
        kind: ``"cosine"`` or ``"mse"``.

    Inputs:
        student: ``[B, D]`` head embeddings.
        teacher: ``[B, D]`` teacher embeddings (detached).

    Returns:
        A scalar tensor.
    """

    def __init__(self, kind: Literal["cosine", "mse"] = "cosine") -> None:
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise ValueError(f"AlignmentLoss kind must be 'cosine' or 'mse', got {kind!r}")
        self.kind = kind

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_2d("student", student)
        _check_2d("teacher", teacher)
        if student.shape != teacher.shape:
            raise ValueError(
                f"student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}"
            )
        student = student.float()
        teacher = teacher.detach().float()
        if self.kind == "mse":
            return F.mse_loss(student, teacher)
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def positives_to_mask(positives: Tensor | None, batch_size: int, num_candidates: int,
                      device: torch.device | None = None) -> Tensor:
    """Normalises the ways of naming positives to a boolean mask ``[B, N]``.

    Accepted forms:

    * ``None``: candidate ``i`` is the positive of query ``i`` (needs ``N >= B``) -- the label-free case
      where the candidates are the teacher's embeddings of the same queries;
    * a bool tensor ``[B, N]``: the mask itself (several ``True`` per row = several positives);
    * an integer tensor ``[B]``: the index of each query's positive, ``-1`` for "no positive";
    * an integer tensor ``[B, P]``: up to ``P`` positive indices per query, padded with ``-1``.
    """
    if positives is None:
        if num_candidates < batch_size:
            raise ValueError(
                f"positives=None pairs query i with candidate i, but there are {num_candidates} candidates "
                f"for {batch_size} queries"
            )
        mask = torch.zeros(batch_size, num_candidates, dtype=torch.bool, device=device)
        idx = torch.arange(batch_size, device=device)
        mask[idx, idx] = True
        return mask
    positives = positives.to(device) if device is not None else positives
    if positives.dtype == torch.bool:
        if tuple(positives.shape) != (batch_size, num_candidates):
            raise ValueError(
                f"a boolean positives mask must have shape {(batch_size, num_candidates)}, "
                f"got {tuple(positives.shape)}"
            )
        return positives
    if positives.is_floating_point() or positives.is_complex():
        raise ValueError("positives must be a bool mask [B, N] or integer indices [B] / [B, P]")
    if positives.dim() == 1:
        positives = positives.unsqueeze(1)
    if positives.dim() != 2 or positives.shape[0] != batch_size:
        raise ValueError(
            f"integer positives must have shape [{batch_size}] or [{batch_size}, P], "
            f"got {tuple(positives.shape)}"
        )
    if (positives >= num_candidates).any() or (positives < -1).any():
        raise ValueError(f"positive indices must be in [0, {num_candidates}) or -1 (none)")
    mask = torch.zeros(batch_size, num_candidates + 1, dtype=torch.bool, device=positives.device)
    # -1 is routed to an extra sink column that is then dropped.
    cols = torch.where(positives < 0, torch.full_like(positives, num_candidates), positives)
    mask.scatter_(1, cols.long(), True)
    return mask[:, :num_candidates]


def gathered_candidates(
    teacher_queries: Tensor, gather: Callable[[Tensor], Tensor], rank: int
) -> tuple[Tensor, Tensor]:
    """Label-free contrastive candidates across processes: every rank's teacher query embeddings, and the index
    of each local query's own embedding among them (its positive).

    Under DDP each process sees its own batch; with these candidates every query has the whole global batch as
    negatives, as in one process with the whole batch. Teacher embeddings are targets (no gradient), so a plain
    gather suffices; the local batches must be equally sized (the trainer drops the last uneven batch).
    """
    everyone = gather(teacher_queries.detach().contiguous())
    own = torch.arange(teacher_queries.shape[0], device=teacher_queries.device) + rank * teacher_queries.shape[0]
    return everyone, own


class ContrastiveLoss(nn.Module):
    """InfoNCE of head query embeddings against teacher-embedded candidates, with in-batch negatives.

    Queries are embedded by the head (student); documents are embedded by the teacher, which is the
    setting at inference (head queries against a teacher-built index). For query ``i`` with positive set
    ``P_i`` over the candidates ``C`` (all candidates plus any hard negatives)::

        loss_i = -log( sum_{p in P_i} exp(s_ip / T) / sum_{c in C} exp(s_ic / T) )

    i.e. multi-positive InfoNCE (with one positive this is the usual cross-entropy). ``s`` is cosine
    similarity. Every candidate that is not a positive of query ``i`` is a negative for it (in-batch
    negatives). Rows without any positive are ignored; the loss is the mean over the remaining rows, and a
    batch where every row is ignored gives a zero that stays on the graph (never NaN).

    Label-free use: pass the teacher's embeddings of the same queries as ``candidates`` and
    ``positives=None``; each query's own teacher embedding is then its positive and the other queries'
    are its negatives.

    Args:
        temperature: softmax temperature ``T`` (``0.05`` = scale 20).

    Inputs:
        student_queries: ``[B, D]`` head query embeddings.
        candidates: ``[N, D]`` teacher candidate embeddings (detached), shared by the whole batch.
        positives: see :func:`positives_to_mask` -- ``None`` (diagonal), bool mask ``[B, N]``, or indices
            ``[B]`` / ``[B, P]`` with ``-1`` for none.
        hard_negatives: optional extra negatives (detached): ``[M, D]`` rows appended to the candidates
            (negatives for every query), or ``[B, H, D]`` per-query rows (negatives for their own query
            only; all-zero rows are treated as padding and skipped).

    Returns:
        A scalar tensor.
    """

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def forward(
        self,
        student_queries: Tensor,
        candidates: Tensor,
        positives: Tensor | None = None,
        hard_negatives: Tensor | None = None,
    ) -> Tensor:
        _check_2d("student_queries", student_queries)
        _check_2d("candidates", candidates)
        if candidates.shape[1] != student_queries.shape[1]:
            raise ValueError(
                f"candidate dim {candidates.shape[1]} != query dim {student_queries.shape[1]}"
            )
        batch, num_candidates = student_queries.shape[0], candidates.shape[0]
        mask = positives_to_mask(positives, batch, num_candidates, device=student_queries.device)

        q = F.normalize(student_queries.float(), dim=-1)
        c = F.normalize(candidates.detach().float(), dim=-1)
        logits = q @ c.T / self.temperature  # [B, N]
        valid = torch.ones_like(logits, dtype=torch.bool)

        if hard_negatives is not None:
            hard = hard_negatives.detach().float()
            if hard.shape[-1] != q.shape[1]:
                raise ValueError(f"hard negative dim {hard.shape[-1]} != query dim {q.shape[1]}")
            if hard.dim() == 2:
                hard_logits = q @ F.normalize(hard, dim=-1).T / self.temperature  # [B, M]
                hard_valid = torch.ones_like(hard_logits, dtype=torch.bool)
            elif hard.dim() == 3 and hard.shape[0] == batch:
                hard_valid = hard.abs().sum(-1) > 0  # [B, H]; all-zero rows are padding
                hard_logits = torch.einsum("bd,bhd->bh", q, F.normalize(hard, dim=-1)) / self.temperature
            else:
                raise ValueError(
                    f"hard_negatives must be [M, D] or [{batch}, H, D], got {tuple(hard_negatives.shape)}"
                )
            logits = torch.cat([logits, hard_logits], dim=1)
            valid = torch.cat([valid, hard_valid], dim=1)
            mask = torch.cat([mask, torch.zeros_like(hard_valid)], dim=1)

        neg_inf = torch.finfo(logits.dtype).min
        all_logits = logits.masked_fill(~valid, neg_inf)
        pos_logits = logits.masked_fill(~mask, neg_inf)
        has_positive = mask.any(dim=1)
        if not bool(has_positive.any()):
            return _zero_keeping_graph(logits)
        per_row = torch.logsumexp(all_logits, dim=1) - torch.logsumexp(pos_logits, dim=1)
        return per_row[has_positive].mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class RankDistillationLoss(nn.Module):
    """KL(teacher || student) between score distributions over the teacher's top-k documents per query.

    For query ``i`` with documents ``d_1..d_k`` (the teacher's top-k), ``p_t = softmax(cos(t_i, d) / T)`` and
    ``p_s = softmax(cos(s_i, d) / T)``; the loss is ``sum_j p_t,j * (log p_t,j - log p_s,j)`` averaged over
    queries. It is zero exactly when the student ranks (and spaces) the top-k as the teacher does. The
    paper found this loss alone collapses; use it beside alignment.

    Args:
        temperature: softmax temperature ``T``, applied to both teacher and student scores.
        top_k: number of documents per query (paper: 128). Given indices or per-query documents with more
            columns are cut to the first ``top_k`` (assumed ordered by the teacher's rank); given a full
            document matrix without indices, the teacher's top ``min(top_k, N)`` are selected here.

    Inputs:
        student_queries: ``[B, D]`` head query embeddings.
        teacher_queries: ``[B, D]`` teacher query embeddings (detached).
        documents: ``[N, D]`` teacher document matrix, or ``[B, k, D]`` per-query documents (detached).
        top_k_indices: optional ``[B, k]`` long indices into an ``[N, D]`` matrix; ``-1`` marks padding
            (a query with fewer documents). Not allowed with ``[B, k, D]`` documents.

    Returns:
        A scalar tensor.
    """

    def __init__(self, temperature: float = 0.05, top_k: int = 128) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        if int(top_k) < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = int(top_k)

    def forward(
        self,
        student_queries: Tensor,
        teacher_queries: Tensor,
        documents: Tensor,
        top_k_indices: Tensor | None = None,
    ) -> Tensor:
        _check_2d("student_queries", student_queries)
        _check_2d("teacher_queries", teacher_queries)
        if student_queries.shape != teacher_queries.shape:
            raise ValueError(
                f"student and teacher query shapes differ: {tuple(student_queries.shape)} vs "
                f"{tuple(teacher_queries.shape)}"
            )
        batch, dim = student_queries.shape
        s = F.normalize(student_queries.float(), dim=-1)
        t = F.normalize(teacher_queries.detach().float(), dim=-1)
        docs = F.normalize(documents.detach().float(), dim=-1)
        if docs.shape[-1] != dim:
            raise ValueError(f"document dim {docs.shape[-1]} != query dim {dim}")

        if docs.dim() == 3:
            if top_k_indices is not None:
                raise ValueError("top_k_indices is only for a [N, D] document matrix, not [B, k, D] ones")
            if docs.shape[0] != batch:
                raise ValueError(f"per-query documents must be [{batch}, k, D], got {tuple(docs.shape)}")
            per_query = docs[:, : self.top_k]
            valid = torch.ones(per_query.shape[:2], dtype=torch.bool, device=per_query.device)
        elif docs.dim() == 2:
            if top_k_indices is None:
                k = min(self.top_k, docs.shape[0])
                top_k_indices = (t @ docs.T).topk(k, dim=1).indices
            if top_k_indices.dim() != 2 or top_k_indices.shape[0] != batch:
                raise ValueError(f"top_k_indices must be [{batch}, k], got {tuple(top_k_indices.shape)}")
            idx = top_k_indices[:, : self.top_k].to(docs.device).long()
            if (idx >= docs.shape[0]).any() or (idx < -1).any():
                raise ValueError(f"top_k_indices must be in [0, {docs.shape[0]}) or -1 (padding)")
            valid = idx >= 0
            per_query = docs[idx.clamp(min=0)]  # [B, k, D]
        else:
            raise ValueError(f"documents must be [N, D] or [B, k, D], got {tuple(documents.shape)}")

        student_scores = torch.einsum("bd,bkd->bk", s, per_query) / self.temperature
        teacher_scores = torch.einsum("bd,bkd->bk", t, per_query) / self.temperature
        neg_inf = torch.finfo(student_scores.dtype).min
        log_p_s = torch.log_softmax(student_scores.masked_fill(~valid, neg_inf), dim=1)
        log_p_t = torch.log_softmax(teacher_scores.masked_fill(~valid, neg_inf), dim=1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).masked_fill(~valid, 0.0).sum(dim=1)  # [B]
        has_docs = valid.any(dim=1)
        if not bool(has_docs.any()):
            return _zero_keeping_graph(student_scores)
        return kl[has_docs].mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, top_k={self.top_k}"


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
