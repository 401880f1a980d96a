"""Tests for retrieval_head.head: seeded init, fp32 on any input dtype, span-only reading, shapes."""

from __future__ import annotations

import pytest
import torch
from core_helpers import one_thread, small_config

from retrieval_head.head import ProjectionHead

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

HIDDEN = 32


def states_and_mask(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(3, 7, HIDDEN, generator=generator) * 50
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
    return states, mask


@pytest.mark.parametrize("head_type", ["linear", "mlp", "transformer"])
def test_init_is_deterministic_from_the_seed(head_type: str) -> None:
    a = ProjectionHead(small_config(head_type=head_type, seed=3), HIDDEN).state_dict()
    b = ProjectionHead(small_config(head_type=head_type, seed=3), HIDDEN).state_dict()
    c = ProjectionHead(small_config(head_type=head_type, seed=4), HIDDEN).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1 and a[k].std() > 0)


def test_init_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    ProjectionHead(small_config(seed=7), HIDDEN)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("head_type", ["linear", "mlp", "transformer"])
@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_output_shape_and_normalisation(head_type: str, pooling: str) -> None:
    states, mask = states_and_mask()
    head = ProjectionHead(small_config(head_type=head_type, pooling=pooling), HIDDEN).eval()
    out = head(states, mask)
    assert out.shape == (3, 16) and out.dtype == torch.float32
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    raw = ProjectionHead(small_config(head_type=head_type, pooling=pooling, normalize=False), HIDDEN).eval()
    assert not torch.allclose(raw(states, mask).norm(dim=-1), torch.ones(3), atol=1e-3)


@pytest.mark.parametrize("head_type", ["linear", "mlp", "transformer"])
def test_parameters_are_fp32_and_bf16_input_is_cast(head_type: str) -> None:
    states, mask = states_and_mask()
    head = ProjectionHead(small_config(head_type=head_type), HIDDEN).eval()
    assert {p.dtype for p in head.parameters()} == {torch.float32}
    out = head(states.bfloat16(), mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out, head(states.bfloat16().float(), mask), atol=1e-6)


@pytest.mark.parametrize("head_type", ["linear", "mlp", "transformer"])
@pytest.mark.parametrize("pooling", ["mean", "last_token"])
def test_only_the_span_is_read(head_type: str, pooling: str) -> None:
    states, mask = states_and_mask()
    head = ProjectionHead(small_config(head_type=head_type, pooling=pooling), HIDDEN).eval()
    changed = states.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum()), HIDDEN) * 1000
    assert torch.allclose(head(states, mask), head(changed, mask), atol=1e-6)


def test_input_scale_is_standardised() -> None:
    states, mask = states_and_mask()
    head = ProjectionHead(small_config(head_type="mlp"), HIDDEN).eval()
    assert torch.allclose(head(states, mask), head(states * 40 + 3, mask), atol=1e-4)


@pytest.mark.parametrize("head_type", ["linear", "mlp", "transformer"])
def test_features_then_project_equals_forward(head_type: str) -> None:
    states, mask = states_and_mask()
    head = ProjectionHead(small_config(head_type=head_type), HIDDEN).eval()
    features = head.features(states, mask)
    assert features.shape == ((3, 7, HIDDEN) if head.token_level else (3, HIDDEN))
    assert torch.allclose(head.project_features(features, mask), head(states, mask), atol=1e-6)


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
def test_functional_forward_equals_the_layer_modules(head_type: str) -> None:
    states, mask = states_and_mask()
    head = ProjectionHead(small_config(head_type=head_type), HIDDEN).eval()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(head.project(head.features(states, mask)), dim=-1)
        assert torch.allclose(head(states, mask), expected, atol=1e-6)


def test_dropout_acts_only_while_training() -> None:
    states, mask = states_and_mask()
    head = ProjectionHead(small_config(head_type="mlp", dropout=0.5), HIDDEN)
    head.train()
    assert not torch.allclose(head(states, mask), head(states, mask))
    head.eval()
    assert torch.equal(head(states, mask), head(states, mask))


def test_transformer_head_has_an_encoder_and_more_parameters() -> None:
    mlp = ProjectionHead(small_config(head_type="mlp"), HIDDEN)
    transformer = ProjectionHead(small_config(head_type="transformer", num_head_layers=2), HIDDEN)
    assert transformer.token_level and not mlp.token_level
    assert len(transformer.encoder.layers) == 2
    assert sum(p.numel() for p in transformer.parameters()) > sum(p.numel() for p in mlp.parameters())
