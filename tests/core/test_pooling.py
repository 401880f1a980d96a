"""Tests for retrieval_head.core.pooling: hand-computed means, the last span token whatever the padding side."""

from __future__ import annotations

import pytest
import torch

from retrieval_head.core.pooling import POOLERS, last_token_pool, mean_pool, pool

# Two rows, four positions, hidden size 2: state at position t of row b is [10*b + t, -(10*b + t)].
STATES = torch.tensor([[[float(10 * b + t), -float(10 * b + t)] for t in range(4)] for b in range(2)])


def test_mean_pool_hand_computed() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    out = mean_pool(STATES, mask)
    assert torch.allclose(out, torch.tensor([[0.5, -0.5], [12.0, -12.0]]))


def test_mean_pool_ignores_states_outside_the_span() -> None:
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]])
    noisy = STATES.clone()
    noisy[mask == 0] = 1e6
    assert torch.equal(mean_pool(noisy, mask), mean_pool(STATES, mask))


def test_mean_pool_full_span_equals_the_masked_mean() -> None:
    """A mask over every column takes the plain-mean shortcut; it must agree with the masked mean."""
    states = torch.randn(3, 5, 8)
    full = mean_pool(states, torch.ones(3, 5, dtype=torch.long))
    masked = mean_pool(torch.cat([states, torch.full((3, 1, 8), 1e6)], dim=1),
                       torch.cat([torch.ones(3, 5), torch.zeros(3, 1)], dim=1))
    assert torch.allclose(full, masked, atol=1e-5)
    assert torch.allclose(full, states.sum(1) / 5, atol=1e-6)


def test_last_token_right_padding() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert torch.equal(last_token_pool(STATES, mask), torch.tensor([[2.0, -2.0], [11.0, -11.0]]))


def test_last_token_left_padding() -> None:
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(last_token_pool(STATES, mask), torch.tensor([[3.0, -3.0], [13.0, -13.0]]))


def test_last_token_span_in_the_middle() -> None:
    mask = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 0]])
    assert torch.equal(last_token_pool(STATES, mask), torch.tensor([[1.0, -1.0], [12.0, -12.0]]))


def test_empty_mask_gives_finite_values() -> None:
    mask = torch.zeros(2, 4, dtype=torch.long)
    assert torch.isfinite(mean_pool(STATES, mask)).all()
    assert torch.isfinite(last_token_pool(STATES, mask)).all()


def test_dtype_is_kept() -> None:
    mask = torch.ones(2, 4, dtype=torch.long)
    assert mean_pool(STATES.bfloat16(), mask).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["mean", "last_token"])
def test_pool_dispatches_by_name(mode: str) -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool(STATES, mask, mode), POOLERS[mode](STATES, mask))
