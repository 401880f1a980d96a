"""An exponential moving average of the head's weights (torch's `AveragedModel`), evaluated and saved in their
place: the dev curve of one head jumps by +-3 points between evaluations, and the average of the last ~1/(1 - decay)
steps is a steadier, usually better head than any one of them."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_update(decay: float):
    """`AveragedModel`'s `multi_avg_fn` for an EMA whose decay warms up as min(decay, (1 + n) / (10 + n)), so the
    average forgets the random start within the first few hundred steps."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor | int) -> None:
        n = int(num_averaged)
        weight = 1 - min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(averaged, current, weight)

    return update


def weight_average(head: nn.Module, decay: float) -> AveragedModel | None:
    """An EMA copy of `head` (its `.module` is a head like `head`), or None for `decay == 0` (off)."""
    if not decay:
        return None
    inputs = getattr(head, "_input_embeddings", ())
    if inputs:  # a reference to the base's embeddings: shared by the copy, never deep-copied
        head._input_embeddings = ()
    try:
        averaged = AveragedModel(head, multi_avg_fn=ema_update(decay))
    finally:
        if inputs:
            head._input_embeddings = inputs
    if inputs:
        averaged.module._input_embeddings = inputs
    return averaged
