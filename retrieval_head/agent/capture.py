"""Capture the head's layer while the base LM runs: find the module that carries it, keep its states.

The capture is a forward hook on the one module whose output *is* `hidden_states[model.layer_index]` (the
input of decoder block `i`, or the final norm for the last index), found once by a probe. The other way,
`generate(output_hidden_states=True, return_dict_in_generate=True)`, makes every layer keep its states for
every step ((L + 1) tensors per step, 31 for SmolLM2) only to read one of them; the hook keeps one [B, T, H]
reference per forward call and nothing else. Measured (benchmarks/results/agent_turn.md, SmolLM2-135M, CPU):
both run within the noise of plain `generate` (the LM's matmuls dominate; the hook body is ~2.5 µs a step),
but the hook keeps 0.05 MiB of states vs 14.1 MiB, and it leaves `generate()`'s arguments and outputs
untouched (any decoding mode and caller kwargs compose with it). Hence the hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from retrieval_head.core.base import base_of
from retrieval_head.core.layer_states import decoder_layers, first_tensor
from retrieval_head.core.model import RetrievalModel


@dataclass(frozen=True)
class CapturePoint:
    """The module whose input (`pre`) or output (`out`) equals `hidden_states[layer_index]`."""

    module: nn.Module
    where: Literal["pre", "out"]
    name: str


def find_capture_point(model: RetrievalModel) -> CapturePoint:
    """Find, with one probe forward, the module that carries the head's layer (works for any causal LM).

    Candidates in order: the input of block `layer_index`, the output of block `layer_index - 1`, then the
    output of every module of the base, innermost last-first (the final norm for the last layer). The first
    one whose tensor equals
    `output_hidden_states[layer_index]` on the probe is used.
    """
    base = base_of(model.base_model)
    num_layers = model.config.base_num_layers
    index = model.layer_index
    list_name, layers = decoder_layers(base, num_layers)
    candidates: list[tuple[nn.Module, str, str]] = []
    if index < num_layers:
        candidates.append((layers[index], "pre", f"{list_name}.{index}"))
    if index >= 1:
        candidates.append((layers[index - 1], "out", f"{list_name}.{index - 1}"))
    # Innermost modules last-first: for the last layer this finds the final norm before its parent decoder.
    for name, module in reversed(list(base.named_modules())):
        if module is not base and "lm_head" not in name and not isinstance(module, nn.ModuleList):
            candidates.append((module, "out", name))
    seen: dict[int, torch.Tensor | None] = {}
    handles = []
    for i, (module, where, _) in enumerate(candidates):
        if where == "pre":
            def hook(mod, args, kwargs, i=i):
                seen[i] = first_tensor(args) if args else kwargs.get("hidden_states")
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            def hook(mod, args, output, i=i):
                seen.setdefault(i, first_tensor(output))
            handles.append(module.register_forward_hook(hook))
    ids = torch.tensor([[1, 2, 3, 4]], device=model.device) % max(int(base.config.get_text_config().vocab_size), 5)
    try:
        with torch.inference_mode():
            reference = base(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True,
                             use_cache=False).hidden_states[index]
    finally:
        for handle in handles:
            handle.remove()
    for i, (module, where, name) in enumerate(candidates):
        got = seen.get(i)
        if got is not None and got.shape == reference.shape and torch.allclose(got, reference, atol=1e-6):
            return CapturePoint(module, where, name)
    raise ValueError(
        f"no module of {type(base).__name__} outputs hidden_states[{index}]; capture during generation is not "
        "supported for this architecture (embed the generated text with model.encode instead)."
    )


class LayerCapture:
    """Context manager keeping the head's layer states of the forward calls made while it is active.

    `keep_from` drops positions before it (counted over all calls): generation keeps only the states of the
    generated tokens, not the prompt's.
    """

    def __init__(self, point: CapturePoint, keep_from: int = 0) -> None:
        self.point = point
        self.keep_from = keep_from
        self.chunks: list[torch.Tensor] = []
        self.seen = 0
        self._handle: Any = None

    def _keep(self, states: torch.Tensor) -> None:
        start, self.seen = self.seen, self.seen + states.shape[1]
        if self.seen > self.keep_from:
            self.chunks.append(states[:, max(0, self.keep_from - start):].detach())

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._keep(first_tensor(args) if args else kwargs["hidden_states"])

    def _out(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._keep(first_tensor(output))

    def __enter__(self) -> LayerCapture:
        self.chunks, self.seen = [], 0
        if self.point.where == "pre":
            self._handle = self.point.module.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            self._handle = self.point.module.register_forward_hook(self._out)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def states(self) -> torch.Tensor:
        """Kept states, [B, T_kept, H] (calls joined on time; position `keep_from` first)."""
        if not self.chunks:
            raise RuntimeError("no forward call was captured past position keep_from")
        return self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks, dim=1)
