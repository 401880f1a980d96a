"""Lower-precision weights for the head's dense layers at inference (CPU): fewer bytes read per query.

At batch 1 the head's time is reading its weights; these kernels read 2x (float16) or 4x (int8) fewer bytes.
Activations are never quantized per batch, so a text's embedding does not depend on what it is batched with:
- `float16`: fbgemm's fp16-weight product, fp32 activations (output within ~1e-4 of fp32);
- `int8`: per-output-channel symmetric int8 weights, bf16 activations (`torch._weight_int8pack_mm`, the kernel
  torchao's int8 weight-only CPU path uses; cosine to fp32 > 0.999).
"""

from __future__ import annotations

import warnings

import torch

QUANTIZE_TO = ("float16", "int8")

Packed = tuple[torch.Tensor, ...]


class HeadQuantizationError(ValueError):
    """The head cannot run with the asked-for weight precision (head type, device, name or torch build)."""


def check_quantize_to(dtype: str) -> None:
    """Raise `HeadQuantizationError` naming the choices when `dtype` is not one of them."""
    if dtype not in QUANTIZE_TO:
        raise HeadQuantizationError(f"quantize_to={dtype!r} is not supported: the head runs with "
                                    f"{' or '.join(map(repr, QUANTIZE_TO))} weights, or None for fp32.")


def pack_weight(weight: torch.Tensor, dtype: str) -> Packed:
    """A linear layer's fp32 weight [out, in] in the form `quantized_linear` reads."""
    weight = weight.detach().float()
    with warnings.catch_warnings():  # fbgemm's fp16 ops warn (once) that they are deprecated
        warnings.simplefilter("ignore")
        if dtype == "float16":
            packed: Packed = (torch.fbgemm_pack_gemm_matrix_fp16(weight),)
        else:
            scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
            qweight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
            packed = (qweight, scales.to(torch.bfloat16))
        quantized_linear(torch.zeros(1, weight.shape[1]), packed, None)  # fails here, not mid-query
    return packed


def quantized_linear(x: torch.Tensor, packed: Packed, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [B, in] (fp32) with the weight as `pack_weight` packed it; fp32 out."""
    if len(packed) == 1:
        return torch.fbgemm_linear_fp16_weight_fp32_activation(x, packed[0], bias)
    out = torch._weight_int8pack_mm(x.to(torch.bfloat16), packed[0], packed[1]).float()
    return out if bias is None else out.add_(bias)
