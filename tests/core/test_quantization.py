"""Tests for retrieval_head.core.quantization: the packed products against F.linear, and the names it accepts."""

from __future__ import annotations

import pytest
import torch
from core_helpers import one_thread
from torch import nn
from torch.nn import functional as F

from retrieval_head.core.quantization import QUANTIZE_TO, HeadQuantizationError, PackedLayers, check_quantize_to

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def mlp(inner: int = 96) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, inner), nn.GELU(), nn.Linear(inner, 48))


def inputs(rows: int = 5) -> torch.Tensor:
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(1))


def test_float16_weights_give_the_fp32_layers_to_fp16_rounding() -> None:
    layers, x = mlp(), inputs()
    out = PackedLayers([layers[0], layers[2]], "float16")(x)
    with torch.no_grad():
        exact = layers(x)
        rounded = F.linear(F.gelu(F.linear(x, layers[0].weight.half().float(), layers[0].bias)),
                           layers[2].weight.half().float(), layers[2].bias)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert not torch.equal(out, exact)  # the packed (rounded) weights were used
    torch.testing.assert_close(out, rounded, atol=1e-5, rtol=1e-5)


def test_int8_weights_stay_close_to_the_fp32_layers() -> None:
    layers, x = mlp(), inputs()
    packed = PackedLayers([layers[0], layers[2]], "int8")
    assert packed.weights[0][0].dtype == torch.int8 and packed.weights[0][0].shape == layers[0].weight.shape
    out = packed(x)
    with torch.no_grad():
        exact = layers(x)
    assert out.dtype == torch.float32 and not torch.equal(out, exact)
    assert F.cosine_similarity(out, exact).min() > 0.999
    assert (out - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("dtype", QUANTIZE_TO)
@pytest.mark.parametrize("depth", [1, 2])
def test_a_row_gives_the_same_output_alone_and_in_a_batch(dtype: str, depth: int) -> None:
    layers, x = mlp(), inputs(rows=7)
    packed = PackedLayers([layers[0], layers[2]][:depth], dtype)
    batched = packed(x)
    assert batched.shape == (7, 48 if depth == 2 else 96)
    for row in range(x.shape[0]):
        torch.testing.assert_close(packed(x[row : row + 1])[0], batched[row], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "fp16", "int4", torch.float16])
def test_unknown_precisions_name_the_choices(dtype) -> None:
    with pytest.raises(HeadQuantizationError, match="'float16' or 'int8'"):
        check_quantize_to(dtype)
