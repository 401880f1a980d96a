"""Pooling of token states over the text's own tokens (a span mask), not the template around it."""

from __future__ import annotations

import torch


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `states` [B, T, H] over positions where `mask` [B, T] is non-zero."""
    if mask.device.type == "cpu" and bool(mask.all()):  # a span over every column, as the agent passes it
        return states.mean(dim=1)
    weights = mask.to(states.dtype).unsqueeze(-1)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def last_token_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the last position where `mask` is non-zero, whatever the padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values.clamp_min(0)
    return states[torch.arange(states.shape[0], device=states.device), last]


POOLERS = {"mean": mean_pool, "last_token": last_token_pool}


def pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states with the named mode (`mean` or `last_token`)."""
    return POOLERS[mode](states, mask)
