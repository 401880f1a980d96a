"""Alignment: match the teacher's vector for the same query."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from retrieval_head.training.losses.checks import check_2d


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
        check_2d("student", student)
        check_2d("teacher", teacher)
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
