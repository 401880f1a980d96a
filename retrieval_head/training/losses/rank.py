"""Rank distillation: order the teacher's top-k documents as the teacher does (KL over softmaxes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval_head.training.losses.checks import check_2d, check_temperature, zero_keeping_graph


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
        self.temperature = check_temperature(temperature)
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
        check_2d("student_queries", student_queries)
        check_2d("teacher_queries", teacher_queries)
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
            return zero_keeping_graph(student_scores)
        return kl[has_docs].mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, top_k={self.top_k}"
