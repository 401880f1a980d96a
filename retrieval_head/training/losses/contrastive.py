"""Contrastive (InfoNCE): keep different queries apart; positives from the teacher or from qrels."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval_head.training.losses.checks import check_2d, check_temperature, zero_keeping_graph


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


def label_free_positives(teacher_queries: Tensor, candidates: Tensor, own: Tensor | None = None) -> Tensor:
    """[B, N] positives for label-free InfoNCE: each query's own candidate (`own` [B] indices; default: the
    diagonal) and every candidate with the same teacher vector -- a text twice in one batch (oversampled sources,
    repeated queries) is a positive of both, never a negative that the loss can only push away from itself."""
    q = F.normalize(teacher_queries.detach().float(), dim=-1)
    c = F.normalize(candidates.detach().float(), dim=-1)
    mask = (q @ c.T) > 1 - 1e-6
    own = torch.arange(q.shape[0], device=q.device) if own is None else own
    mask[torch.arange(q.shape[0], device=q.device), own] = True
    return mask


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
        self.temperature = check_temperature(temperature)

    def forward(
        self,
        student_queries: Tensor,
        candidates: Tensor,
        positives: Tensor | None = None,
        hard_negatives: Tensor | None = None,
    ) -> Tensor:
        check_2d("student_queries", student_queries)
        check_2d("candidates", candidates)
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
            return zero_keeping_graph(logits)
        per_row = torch.logsumexp(all_logits, dim=1) - torch.logsumexp(pos_logits, dim=1)
        return per_row[has_positive].mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
