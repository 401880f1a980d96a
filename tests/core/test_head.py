"""Tests for retrieval_head.core.head: seeded init, fp32 on any input dtype, span-only reading, shapes."""

from __future__ import annotations

import pytest
import torch
from core_helpers import one_thread, small_config

from retrieval_head.core.head import ProjectionHead

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


@pytest.mark.parametrize("head_type", ["linear", "mlp"])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_quantized_inference_stays_close_to_fp32_and_keeps_the_weights(head_type: str, dtype: str) -> None:
    states, mask = states_and_mask()
    head = ProjectionHead(small_config(head_type=head_type), HIDDEN).eval()
    state = {k: v.clone() for k, v in head.state_dict().items()}
    with torch.inference_mode():
        exact = head(states, mask)
        assert head.quantize(dtype) is head and head.quantized_to == dtype
        quantized = head(states, mask)
    assert not torch.equal(quantized, exact)  # the packed weights ran
    limit = 1e-3 if dtype == "float16" else 2e-2
    assert (quantized - exact).abs().max() < limit
    assert set(head.state_dict()) == set(state)  # nothing packed is saved
    assert all(torch.equal(head.state_dict()[k], v) for k, v in state.items())
    with torch.inference_mode():
        torch.testing.assert_close(head.quantize(None)(states, mask), exact, atol=0, rtol=0)


def test_quantized_head_uses_fp32_when_training_or_when_gradients_are_wanted() -> None:
    states, mask = states_and_mask()
    head = ProjectionHead(small_config(), HIDDEN).eval()
    with torch.inference_mode():
        exact = head(states, mask)
    head.quantize("int8")
    with torch.no_grad():
        assert not torch.equal(head(states, mask), exact)
    out = head(states, mask)  # gradients enabled: the fp32 weights, differentiable
    torch.testing.assert_close(out.detach(), exact, atol=0, rtol=0)
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    head.train()
    with torch.no_grad():
        torch.testing.assert_close(head(states, mask), exact, atol=0, rtol=0)


def test_quantized_head_packs_again_when_its_weights_change() -> None:
    states, mask = states_and_mask()
    head = ProjectionHead(small_config(), HIDDEN).eval().quantize("float16")
    with torch.inference_mode():
        before = head(states, mask)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(-1.5)  # in place, as an optimizer step or load_state_dict does
    with torch.inference_mode():
        after = head(states, mask)
        exact = head.quantize(None)(states, mask)
    assert (after - before).abs().max() > 0.1
    assert (after - exact).abs().max() < 1e-3


def test_quantize_refuses_a_transformer_head_and_unknown_precisions() -> None:
    head = ProjectionHead(small_config(head_type="transformer"), HIDDEN)
    with pytest.raises(ValueError, match="'transformer'"):
        head.quantize("int8")
    mlp = ProjectionHead(small_config(), HIDDEN)
    with pytest.raises(ValueError, match="'float16' or 'int8'"):
        mlp.quantize("bfloat16")
    assert mlp.quantized_to is None


def test_quantize_on_a_torch_without_the_kernel_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delattr(torch, "fbgemm_pack_gemm_matrix_fp16")  # as a later torch may drop it
    head = ProjectionHead(small_config(), HIDDEN).eval()
    with pytest.raises(ValueError, match="cannot run float16 head weights"):
        head.quantize("float16")
    assert head.quantized_to is None
    states, mask = states_and_mask()
    with torch.inference_mode():
        assert torch.isfinite(head(states, mask)).all()  # still the working fp32 head


def test_a_head_made_under_inference_mode_quantizes_and_packs_loaded_weights_again() -> None:
    states, mask = states_and_mask()
    donor = ProjectionHead(small_config(seed=3), HIDDEN).eval()
    with torch.inference_mode():  # its parameters are inference tensors, which keep no version counter
        head = ProjectionHead(small_config(), HIDDEN).eval().quantize("int8")
        before = head(states, mask)
        head.load_state_dict(donor.state_dict())  # copied in place
        after = head(states, mask)
        expected = donor(states, mask)
    assert (after - before).abs().max() > 0.1
    assert torch.nn.functional.cosine_similarity(after, expected).min() > 0.999


def static_head(**overrides) -> ProjectionHead:
    head = ProjectionHead(small_config(static_dim=4, base_vocab_size=50, **overrides), HIDDEN).eval()
    torch.nn.init.normal_(head.static_out.weight, generator=torch.Generator().manual_seed(2))
    return head


def test_a_fresh_static_branch_adds_nothing_and_a_trained_one_reads_only_the_span_ids() -> None:
    states, mask = states_and_mask()
    ids = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(0))
    fresh = ProjectionHead(small_config(static_dim=4, base_vocab_size=50), HIDDEN).eval()
    plain = ProjectionHead(small_config(), HIDDEN).eval()
    assert torch.allclose(fresh(states, mask, ids), plain(states, mask), atol=1e-6)
    head = static_head()
    out = head(states, mask, ids)
    assert not torch.allclose(out, plain(states, mask), atol=1e-3)
    other = torch.where(mask.bool(), ids, (ids + 7) % 50)  # change only the ids outside the span
    assert torch.allclose(head(states, mask, other), out, atol=1e-6)
    inside = torch.where(mask.bool(), (ids + 7) % 50, ids)
    assert not torch.allclose(head(states, mask, inside), out, atol=1e-3)
    alone = head(states[1:2, 2:5], mask[1:2, 2:5], ids[1:2, 2:5])  # padding and position do not matter
    assert torch.allclose(alone, out[1:2], atol=1e-5)


def test_a_static_branch_without_ids_or_vocabulary_is_a_clear_error() -> None:
    states, mask = states_and_mask()
    with pytest.raises(ValueError, match="token ids"):
        static_head()(states, mask)
    with pytest.raises(ValueError, match="base_vocab_size"):
        ProjectionHead(small_config(static_dim=4), HIDDEN)
    with pytest.raises(ValueError, match="static_dim"):
        small_config(static_dim=-1)


def test_a_base_embedding_view_pools_the_bases_own_token_vectors_and_is_never_saved() -> None:
    states, mask = states_and_mask()
    ids = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(0))
    head = static_head(static_base_embeddings=True)
    assert head.static_out.weight.shape == (head.config.output_dim, 4 + HIDDEN)
    with pytest.raises(ValueError, match="tie_input_embeddings"):
        head(states, mask, ids)
    embeddings = torch.nn.Embedding(50, HIDDEN)
    head.tie_input_embeddings(embeddings)
    pooled = head.static_pool(torch.where(mask.bool(), ids, -1))
    row = ids[0][mask[0].bool()]
    vectors = torch.nn.functional.layer_norm(embeddings.weight[row], (HIDDEN,))
    assert torch.allclose(pooled[0, 4:], vectors.mean(0), atol=1e-5)
    assert torch.allclose(pooled[0, :4], head.static.weight[row].mean(0), atol=1e-6)
    assert not any(name.startswith("_input") for name in head.state_dict())  # the base's matrix is not the head's
    before = head(states, mask, ids)
    with torch.no_grad():
        embeddings.weight.mul_(-1)
    assert not torch.allclose(head(states, mask, ids), before, atol=1e-3)  # it reads the tied module


def test_a_base_embedding_view_needs_a_static_branch() -> None:
    with pytest.raises(ValueError, match="static_dim > 0"):
        small_config(static_base_embeddings=True)


def test_static_ids_replace_the_span_ids_and_padded_rows_pool_their_valid_ids() -> None:
    states, mask = states_and_mask()
    ids = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(0))
    head = static_head()
    wide = torch.tensor([[3, 4, 5, -1], [7, -1, -1, -1], [1, 2, 3, 4]])
    out = head(states, mask, ids, static_ids=wide)
    expected_pool = torch.stack([head.static.weight[[3, 4, 5]].mean(0), head.static.weight[7],
                                 head.static.weight[[1, 2, 3, 4]].mean(0)])
    assert torch.allclose(head.static_pool(wide), expected_pool, atol=1e-6)
    assert torch.allclose(out, head(states, mask, None, static_ids=wide), atol=1e-6)  # the span's ids are not read
    assert not torch.allclose(out, head(states, mask, ids), atol=1e-3)
    assert torch.allclose(head.static_pool(torch.full((1, 3), -1)), torch.zeros(1, 4))  # an empty row adds nothing


@pytest.mark.parametrize("head_type", ["mlp", "linear"])
def test_the_fused_inference_path_equals_the_layer_by_layer_one_and_follows_new_weights(head_type: str) -> None:
    states, mask = states_and_mask()
    ids = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(0))
    head = static_head(head_type=head_type)
    with torch.enable_grad():
        layered = head(states, mask, ids)  # gradients wanted: the layer-by-layer path
    with torch.inference_mode():
        fused = head(states, mask, ids)
    assert head._fused is not None and torch.allclose(fused, layered, atol=1e-6)
    with torch.inference_mode():  # a span cut to its columns (what the agent passes): the unpadded fast path
        alone = head(states[1:2, 2:5], mask[1:2, 2:5].bool(), ids[1:2, 2:5])
    assert torch.allclose(alone, layered[1:2], atol=1e-5)
    with torch.no_grad():
        head.static_out.weight.mul_(-1)  # an in-place update must reach the fused matrix
        flipped = head(states, mask, ids)
    with torch.enable_grad():
        assert torch.allclose(flipped, head(states, mask, ids), atol=1e-6)
    assert not torch.allclose(flipped, fused, atol=1e-3)


@pytest.mark.parametrize("quantize", [None, "float16"])
def test_evaluation_after_fused_adamw_steps_reads_the_new_weights_not_a_stale_cache(quantize) -> None:
    states, mask = states_and_mask()
    ids = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(0))
    head = static_head().quantize(quantize).eval()
    with torch.inference_mode():
        head(states, mask, ids)  # an evaluation fills the caches
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1, fused=True)  # steps do not bump weight versions
    head.train()
    for _ in range(3):
        head(states, mask, ids).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    head.eval()
    with torch.inference_mode():
        evaluated = head(states, mask, ids)
    fresh = static_head().quantize(quantize).eval()
    fresh.load_state_dict(head.state_dict())
    with torch.inference_mode():
        assert torch.allclose(evaluated, fresh(states, mask, ids), atol=1e-6)


def attention_head(static_dim: int = 0, **overrides) -> ProjectionHead:
    """An attention-pooling head whose scores are trained-like (non-zero), and the same head pooling by mean."""
    config = small_config(pooling="attention", static_dim=static_dim,
                          base_vocab_size=50 if static_dim else None, **overrides)
    head = ProjectionHead(config, HIDDEN).eval()
    if static_dim:
        torch.nn.init.normal_(head.static_out.weight, generator=torch.Generator().manual_seed(2))
    return head


def test_a_fresh_attention_pooling_head_pools_as_the_mean() -> None:
    states, mask = states_and_mask()
    ids = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(3))
    for static_dim in (0, 4):
        head = attention_head(static_dim)
        mean = ProjectionHead(small_config(static_dim=static_dim, base_vocab_size=50 if static_dim else None),
                              HIDDEN).eval()
        mean.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("attend.")})
        assert head.token_level and head.features(states, mask).shape == (3, 7, HIDDEN)
        args = (states, mask, ids) if static_dim else (states, mask)
        assert torch.allclose(head(*args), mean(*args), atol=1e-5)
        torch.nn.init.normal_(head.attend.weight, generator=torch.Generator().manual_seed(4))
        assert not torch.allclose(head(*args), mean(*args), atol=1e-3)  # learned scores move the pooling


def test_attention_pooling_reads_only_the_span_and_is_the_same_batched_or_alone() -> None:
    states, mask = states_and_mask()
    ids = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(3))
    head = attention_head(4)
    torch.nn.init.normal_(head.attend.weight, generator=torch.Generator().manual_seed(4))
    assert head.attend.out_features == 4 + 1  # one score per group of dims, one for the static ids
    out = head(states, mask, ids)
    changed, other_ids = states.clone(), ids.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum()), HIDDEN) * 1000
    other_ids[mask == 0] = 0
    assert torch.allclose(out, head(changed, mask, other_ids), atol=1e-5)
    for row in range(3):
        span = mask[row].bool()
        alone = head(states[row : row + 1, span], torch.ones((1, int(span.sum())), dtype=torch.long),
                     ids[row : row + 1, span])
        assert torch.allclose(alone[0], out[row], atol=1e-5)


def test_attention_pooling_learns_and_quantizes() -> None:
    states, mask = states_and_mask()
    head = attention_head().train()
    head.project_features(head.features(states, mask), mask).sum().backward()
    assert head.attend.weight.grad is not None and head.attend.weight.grad.abs().sum() > 0
    head.eval()
    torch.nn.init.normal_(head.attend.weight, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        exact = head(states, mask)
        quantized = head.quantize("float16")(states, mask)
    assert (quantized - exact).abs().max() < 1e-3


def test_attention_pooling_is_for_pooled_heads_and_weighs_only_span_ids() -> None:
    with pytest.raises(ValueError, match="'attention' is for 'linear' and 'mlp'"):
        small_config(pooling="attention", head_type="transformer")
    conversation = attention_head(4, static_span="conversation")
    assert conversation.attend.out_features == 4  # the branch's ids are not the span's tokens: mean for them
    states, mask = states_and_mask()
    head = attention_head(4)
    with pytest.raises(ValueError, match="not the span's tokens"):
        head(states, mask, static_ids=torch.zeros((3, 2), dtype=torch.long))


def test_a_fresh_attention_head_with_the_base_embedding_view_pools_as_the_mean() -> None:
    states, mask = states_and_mask()
    ids = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(3))
    embeddings = torch.nn.Embedding(50, HIDDEN)
    head = attention_head(4, static_base_embeddings=True)
    mean = ProjectionHead(small_config(static_dim=4, base_vocab_size=50, static_base_embeddings=True), HIDDEN).eval()
    mean.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("attend.")})
    for module in (head, mean):
        module.tie_input_embeddings(embeddings)
    assert torch.allclose(head(states, mask, ids), mean(states, mask, ids), atol=1e-5)
