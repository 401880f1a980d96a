"""Lower-precision weights for the head's dense layers at inference (CPU): fewer bytes read per query.

At batch 1 the head's time is reading its weights and dispatching its few ops; these kernels read 2x (float16)
or 4x (int8) fewer bytes. Activations are never quantized per batch, so a text's embedding does not depend on
what it is batched with:
- `float16`: fbgemm's fp16-weight product with fused bias, fp32 activations (within ~1e-4 of fp32);
- `int8`: per-output-channel symmetric int8 weights, bf16 activations (`torch._weight_int8pack_mm`, the kernel
  torchao's int8 weight-only CPU path uses), the last bias added in fp32 (cosine to fp32 > 0.999).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from retrieval_head.core.errors import RetrievalHeadError

QUANTIZE_TO = ("float16", "int8")


class HeadQuantizationError(RetrievalHeadError, ValueError):
    """The head cannot run with the asked-for weight precision (head type, device, name or torch build)."""


def check_quantize_to(dtype: str) -> None:
    """Raise `HeadQuantizationError` naming the choices when `dtype` is not one of them."""
    if dtype not in QUANTIZE_TO:
        raise HeadQuantizationError(f"quantize_to={dtype!r} is not supported: the head runs with "
                                    f"{' or '.join(map(repr, QUANTIZE_TO))} weights, or None for fp32.")


def layers_key(layers: Sequence[nn.Linear]) -> tuple[tuple[int, int], ...]:
    """Changes whenever a layer's weight or bias is replaced or updated in place (optimizer, load_state_dict).

    Tensors made under `torch.inference_mode()` (a head loaded there) keep no version counter: for them only a
    replaced tensor shows; the head also drops its packed weights whenever `load_state_dict` runs.
    """
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version)
                 for layer in layers for t in (layer.weight, layer.bias))


class PackedLayers:
    """A chain of linear layers (GELU between them) with their weights packed in `dtype`; fp32 in, fp32 out.

    A snapshot: `key` records the parameters it was packed from (`layers_key`), for the owner to repack.
    """

    def __init__(self, layers: Sequence[nn.Linear], dtype: str) -> None:
        check_quantize_to(dtype)
        self.dtype, self.key = dtype, layers_key(layers)
        weights = [layer.weight.detach().float() for layer in layers]
        biases = [layer.bias.detach().float().clone() for layer in layers]
        with warnings.catch_warnings():  # fbgemm's fp16 ops warn (once) that they are deprecated
            warnings.simplefilter("ignore")
            if dtype == "float16":
                self.weights = [torch.fbgemm_pack_gemm_matrix_fp16(w) for w in weights]
                self.biases = biases
            else:
                self.weights = [int8_per_channel(w) for w in weights]
                self.biases = [b.to(torch.bfloat16) for b in biases[:-1]] + biases[-1:]
            self(torch.zeros(1, weights[0].shape[1]))  # a kernel missing from this build fails here, not mid-query

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' output [B, out] (fp32) for x [B, in] (fp32)."""
        last = len(self.weights) - 1
        if self.dtype == "float16":
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                x = torch.fbgemm_linear_fp16_weight_fp32_activation(F.gelu(x) if i else x, w, b)
            return x
        x = x.to(torch.bfloat16)
        for i, ((q, scales), b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch._weight_int8pack_mm(F.gelu(x) if i else x, q, scales)
            x = x.float().add_(b) if i == last else x.add_(b)
        return x


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, bf16 scale per output row): symmetric, the row's largest magnitude maps to 127."""
    scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales.to(torch.bfloat16)
