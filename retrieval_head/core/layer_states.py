"""Hidden states of chosen layers of any causal LM, computing nothing the caller throws away.

`output_hidden_states=True` on a causal LM runs every decoder block and a vocabulary-sized logit row per token,
then the head reads one layer of it. Here the LM's inner model (no LM head, no logits) runs, forward hooks keep
the wanted layers' states, and the pass stops at the deepest wanted block. The states are the very tensors of
a full pass: `hidden_states[i]` is the input of block `i` (the output of block `i - 1`); only the last index
(the final norm's output) needs the whole decoder, which then runs without its logits. Architecture-generic:
the blocks are found as the model's `ModuleList` of `num_hidden_layers` modules (llama, qwen2, gemma, gpt2, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the hook of the deepest wanted block: nothing after it is needed."""


def first_tensor(value: Any) -> torch.Tensor | None:
    """The hidden-state tensor of a module's output (a tensor, a tuple starting with one, or a ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return getattr(value, "last_hidden_state", None)


def num_layers_of(model: nn.Module) -> int:
    """`num_hidden_layers` of a causal LM's (text) config."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.num_hidden_layers)


def decoder_layers(model: nn.Module, num_layers: int | None = None) -> tuple[str, nn.ModuleList]:
    """(name, blocks): the model's list of `num_hidden_layers` decoder blocks."""
    num_layers = num_layers_of(model) if num_layers is None else num_layers
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not lists:
        raise ValueError(f"found no list of {num_layers} decoder blocks in {type(model).__name__}")
    return lists[0]


def inner_model(model: nn.Module) -> nn.Module:
    """The decoder under the LM head (`LlamaForCausalLM.model`, `GPT2LMHeadModel.transformer`, ...)."""
    inner = getattr(model, "base_model", model)
    return inner if isinstance(inner, nn.Module) else model


def hidden_states_at(
    model: nn.Module, layers: Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> dict[int, torch.Tensor]:
    """`{i: output_hidden_states[i]}` for each index in `layers` (0 = embeddings, num_layers = last), one pass.

    `model` is a transformers causal LM (a PEFT wrapper is looked through: its tuner layers sit in the modules);
    `kwargs` go to its inner model (a KV cache, ...). The pass stops after the deepest wanted block and never
    computes logits.
    """
    get_base = getattr(model, "get_base_model", None)
    model = get_base() if callable(get_base) else model
    num_layers = num_layers_of(model)
    wanted = sorted(set(int(i) for i in layers))
    if not wanted or wanted[0] < 0 or wanted[-1] > num_layers:
        raise ValueError(f"layer indices {list(layers)} must lie in 0..{num_layers} (index into output_hidden_states)")
    inner = inner_model(model)
    call = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    call.update(kwargs)
    if wanted[-1] == num_layers:  # the final norm's output: the whole decoder, still no logits
        states = inner(**call, output_hidden_states=True).hidden_states
        return {i: states[i] for i in wanted}
    _, blocks = decoder_layers(model, num_layers)
    deepest = wanted[-1]
    found: dict[int, torch.Tensor] = {}
    handles = []

    def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        found[0] = first_tensor(args) if args else kwargs.get("hidden_states")
        if deepest == 0:
            raise _Stop

    def keep_output(index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            found[index] = first_tensor(output)
            if index == deepest:
                raise _Stop
        return hook

    if 0 in wanted:
        handles.append(blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True))
    for index in wanted:
        if index > 0:
            handles.append(blocks[index - 1].register_forward_hook(keep_output(index)))
    try:
        inner(**call)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in wanted if found.get(i) is None]
    if missing:
        raise ValueError(f"{type(model).__name__}: the decoder blocks did not yield hidden_states{missing}")
    return {i: found[i] for i in wanted}
