"""Training an encode adapter: a LoRA on the base and the head, jointly, against teacher query embeddings.

`train_encode_adapter(model, texts, teacher_embeddings)` adds a LoRA named `encode` to the base (see
`retrieval_head.adapters.encode_adapter`) and trains it with the head using the same `DistillationLoss` as the cached
trainer (alignment + label-free in-batch contrastive, + rank distillation when teacher `documents` are given).

Unlike `Trainer`, it cannot train on cached LM features: the LM's states change as the LoRA trains, so every step
runs the LM forward and backward (through the frozen base into the LoRA weights). A step therefore costs a
training step of the LM on the batch (activations kept for backward), not a head-only step; keep batches small.
It is a plain loop in one process (no accelerate/DDP, checkpoints or resume): a recipe switch in the cached
trainer would not fit, hence a separate function (documented in training/README.md).

COST at inference, plainly: a head with an encode adapter reads adapted states that generation (adapter off, so
its output stays the base's) never computes, so the agent path can no longer reuse generation's hidden states:
embedding a query the LM wrote takes an extra LM pass with the adapter on (`model.encode(text)`), and
`NativeRetriever` refuses such a model. Choose it only where the retention gain is worth that pass
(benchmarks/results/encode_adapter.md measures it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from retrieval_head.adapters.encode_adapter import add_encode_adapter, has_encode_adapter, refresh_record, trainable
from retrieval_head.core.templates import EncodeInput
from retrieval_head.training.losses import DistillationLoss

logger = logging.getLogger(__name__)


@dataclass
class EncodeAdapterResult:
    steps: int
    seconds: float
    encode_adapter: dict[str, Any]
    log: list[dict[str, float]] = field(default_factory=list)  # one record per logged step (loss parts, lr)


def train_encode_adapter(
    model: Any,
    texts: Sequence[EncodeInput],
    teacher_embeddings: torch.Tensor | np.ndarray,
    *,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: Sequence[str] | str | None = None,
    documents: torch.Tensor | np.ndarray | None = None,
    loss_weights: Mapping[str, float] | None = None,
    top_k: int = 128,
    lr: float = 2e-4,
    adapter_lr: float | None = None,
    weight_decay: float = 0.01,
    batch_size: int = 16,
    max_steps: int = 200,
    warmup_ratio: float = 0.05,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    log_every: int = 10,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> EncodeAdapterResult:
    """Train a LoRA (`r`, `alpha`, `target_modules`; PEFT's default targets for None) and the head jointly.

    Args:
        model: a `RetrievalModel` on a plain base; an encode adapter is added unless it has one already.
        texts: training inputs (texts or conversations), rendered as `encode_query` renders them.
        teacher_embeddings: [N, output_dim] teacher embeddings of the same inputs (the targets).
        documents: optional [M, output_dim] teacher document embeddings for the rank part of the loss.
        loss_weights: `DistillationLoss` weights; default alignment 1.0, contrastive 0.1, rank 0.1 with
            `documents` (0 without).
        lr / adapter_lr: AdamW learning rate of the head / of the LoRA (default: `lr`); warmup + cosine.

    Returns the step count, seconds, the adapter record (`config.encode_adapter`) and the loss log. The model
    is left in inference mode with the LoRA frozen; `model.save_pretrained(dir)` writes head + adapter.
    """
    teacher = torch.as_tensor(np.asarray(teacher_embeddings) if not torch.is_tensor(teacher_embeddings)
                              else teacher_embeddings).float()
    items = list(texts)
    if teacher.dim() != 2 or teacher.shape[0] != len(items) or not items:
        raise ValueError(f"teacher_embeddings must be [len(texts)={len(items)}, dim] with texts non-empty, "
                         f"got {tuple(teacher.shape)}")
    if teacher.shape[1] != model.config.output_dim:
        raise ValueError(f"teacher embeddings are {teacher.shape[1]}-dim but the head outputs "
                         f"{model.config.output_dim}; set output_dim to the teacher's dim")
    docs = None if documents is None else torch.as_tensor(
        np.asarray(documents) if not torch.is_tensor(documents) else documents).float()
    weights = dict(loss_weights) if loss_weights is not None else {
        "alignment": 1.0, "contrastive": 0.1, "rank": 0.1 if docs is not None else 0.0}
    loss_fn = DistillationLoss(weights, top_k=top_k)
    if max_steps <= 0 or batch_size <= 0:
        raise ValueError("max_steps and batch_size must be positive")
    if not has_encode_adapter(model):
        add_encode_adapter(model, r=r, alpha=alpha, target_modules=target_modules)

    device = model.device
    renderer = model.renderer
    prompt = (model.config.prompts or {}).get("query", "")
    rendered = [renderer.render(item, prompt) for item in items]
    teacher, docs = teacher.to(device), (docs.to(device) if docs is not None else None)

    torch.manual_seed(seed)  # the head's dropout
    lora = trainable(model, True)
    head_params = [p for p in model.head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": head_params, "lr": lr}, {"params": lora, "lr": adapter_lr if adapter_lr is not None else lr}],
        weight_decay=weight_decay,
    )
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * max_steps), max_steps)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    take = min(batch_size, len(items))
    log: list[dict[str, float]] = []
    started = time.perf_counter()
    model.train(True)
    try:
        for step in range(1, max_steps + 1):
            if len(order) < take:
                order += torch.randperm(len(items), generator=generator).tolist()
            rows, order = order[:take], order[take:]
            batch = renderer.collate([rendered[i] for i in rows], device=device)
            student = model(**batch)  # layer_states: the LM runs with the adapter on, gradients reach the LoRA
            loss, parts = loss_fn(student, teacher[rows], rank_documents=docs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head_params + lora, max_grad_norm)
            optimizer.step()
            scheduler.step()
            if step % log_every == 0 or step == 1 or step == max_steps:
                record = {"step": step, "lr": scheduler.get_last_lr()[0],
                          **{f"loss/{k}": v for k, v in parts.items()}}
                log.append(record)
                if on_log is not None:
                    on_log(record)
    finally:
        model.train(False)
        trainable(model, False)
    return EncodeAdapterResult(max_steps, time.perf_counter() - started, refresh_record(model), log)
