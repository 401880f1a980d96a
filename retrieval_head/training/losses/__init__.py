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

from retrieval_head.training.losses.alignment import AlignmentLoss
from retrieval_head.training.losses.contrastive import (
    ContrastiveLoss,
    gathered_candidates,
    label_free_positives,
    positives_to_mask,
)
from retrieval_head.training.losses.distillation import DEFAULT_WEIGHTS, LOSS_NAMES, DistillationLoss
from retrieval_head.training.losses.rank import RankDistillationLoss

__all__ = [
    "DEFAULT_WEIGHTS",
    "LOSS_NAMES",
    "AlignmentLoss",
    "ContrastiveLoss",
    "DistillationLoss",
    "RankDistillationLoss",
    "gathered_candidates",
    "label_free_positives",
    "positives_to_mask",
]
