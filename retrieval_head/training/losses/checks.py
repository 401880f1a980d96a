"""Argument checks shared by the losses."""

from __future__ import annotations

import math

from torch import Tensor


def check_2d(name: str, tensor: Tensor) -> None:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, dim], got shape {tuple(tensor.shape)}")


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def zero_keeping_graph(tensor: Tensor) -> Tensor:
    """A scalar zero that is still connected to ``tensor``'s graph (so ``backward()`` works)."""
    return tensor.sum() * 0.0
