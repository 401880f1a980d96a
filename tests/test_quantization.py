"""Tests for retrieval_head.quantization: the packed products against F.linear, and the names it accepts."""

from __future__ import annotations

import pytest
import torch
from core_helpers import one_thread
from torch.nn import functional as F

from retrieval_head.quantization import (
    QUANTIZE_TO,
    HeadQuantizationError,
    check_quantize_to,
    pack_weight,
    quantized_linear,
)

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def weight_bias_input(rows: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator) / 8
    return weight, torch.randn(96, generator=generator), torch.randn(rows, 64, generator=generator)


def test_float16_weights_give_the_fp32_product_to_fp16_rounding() -> None:
    weight, bias, x = weight_bias_input()
    out = quantized_linear(x, pack_weight(weight, "float16"), bias)
    exact = F.linear(x, weight, bias)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert not torch.equal(out, exact)  # the packed (rounded) weights were used
    torch.testing.assert_close(out, F.linear(x, weight.half().float(), bias), atol=1e-5, rtol=1e-5)


def test_int8_weights_stay_close_to_the_fp32_product() -> None:
    weight, bias, x = weight_bias_input()
    packed = pack_weight(weight, "int8")
    assert packed[0].dtype == torch.int8 and packed[0].shape == weight.shape
    out = quantized_linear(x, packed, bias)
    exact = F.linear(x, weight, bias)
    assert out.dtype == torch.float32 and not torch.equal(out, exact)
    assert F.cosine_similarity(out, exact).min() > 0.999
    assert (out - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("dtype", QUANTIZE_TO)
def test_a_row_gives_the_same_output_alone_and_in_a_batch(dtype: str) -> None:
    weight, bias, x = weight_bias_input(rows=7)
    packed = pack_weight(weight, dtype)
    batched = quantized_linear(x, packed, bias)
    for row in range(x.shape[0]):
        torch.testing.assert_close(quantized_linear(x[row : row + 1], packed, bias)[0], batched[row],
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "fp16", "int4", torch.float16])
def test_unknown_precisions_name_the_choices(dtype) -> None:
    with pytest.raises(HeadQuantizationError, match="'float16' or 'int8'"):
        check_quantize_to(dtype)
