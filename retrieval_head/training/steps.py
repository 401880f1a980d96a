"""One optimisation step's pieces: the head as DDP sees it, the epoch order, the AdamW groups, the loss inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class FeatureHead(nn.Module):
    """`head.project_features` as a module's forward, so DDP's hooks see (and sync) the gradients."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                span_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head.project_features(features, mask, span_ids)


class EpochOrder(torch.utils.data.Dataset):
    """Example indices in a seeded order per epoch (`use_epoch`), so a run and its resumed copy agree.

    With `groups` (a group id per example, e.g. its dataset) and `batch_size`, every run of `batch_size`
    consecutive indices comes from one group where it can (sentence-transformers' per-dataset batches): each group is
    shuffled and cut into full batches, what is left over of every group fills mixed batches, and the batches are
    shuffled. In-batch negatives then come from the same domain, not trivially from another dataset.

    Not named `set_epoch`: accelerate calls a dataset's `set_epoch` with its own count of iterations over the
    loader, which restarts at 0 for the loader `skip_first_batches` returns on resume.
    """

    def __init__(self, size: int, seed: int, groups: Sequence[int] | None = None, batch_size: int = 0) -> None:
        if groups is not None and (len(groups) != size or batch_size < 1):
            raise ValueError(f"groups needs one id per example ({len(groups)} for {size}) and a batch_size >= 1")
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.groups = None if groups is None else torch.as_tensor(list(groups), dtype=torch.long)
        self.use_epoch(0)

    def use_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.groups is None:
            self.order = torch.randperm(self.size, generator=generator).tolist()
            return
        shuffled = torch.randperm(self.size, generator=generator)
        batches, rest, b = [], [], self.batch_size
        for group in torch.unique(self.groups).tolist():
            rows = shuffled[self.groups[shuffled] == group]
            full = len(rows) - len(rows) % b
            batches += list(rows[:full].split(b))
            rest.append(rows[full:])
        rest = torch.cat(rest)
        rest = rest[torch.randperm(len(rest), generator=generator)]
        full = len(rest) - len(rest) % b
        batches += list(rest[:full].split(b))
        picked = torch.randperm(len(batches), generator=generator).tolist()
        self.order = torch.cat([batches[i] for i in picked] + [rest[full:]]).tolist()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        return self.order[i]


def parameter_groups(head: nn.Module, lr: float, static_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups: the static branch's table (rows updated only when their token occurs) at `lr * scale`."""
    static = [p for n, p in head.named_parameters() if ".static." in f".{n}"]
    rest = [p for n, p in head.named_parameters() if ".static." not in f".{n}"]
    groups = [{"params": rest, "lr": lr}]
    if static:
        groups.append({"params": static, "lr": lr * static_lr_scale})
    return groups


def adamw(head: nn.Module, lr: float, static_lr_scale: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`, with torch's fused kernel (CPU and CUDA): the same update, ~10x faster on
    a CPU for the static branch's 12.6M-entry table, whose dense update was most of a training step."""
    return torch.optim.AdamW(parameter_groups(head, lr, static_lr_scale), lr=lr, weight_decay=weight_decay,
                             fused=True)


def regularize(batch: dict[str, torch.Tensor], token_dropout: float, feature_dropout: float,
               generator: torch.Generator | None = None, span_dropout: float = 0.0) -> dict[str, torch.Tensor]:
    """A training batch with the head's inputs perturbed: for a token-level head, each span token dropped from
    the pooling (its state and its id) with probability `span_dropout`; each span id of the static branch dropped
    (set to -1) with probability `token_dropout`; dropout at `feature_dropout` on the LM features. Every row keeps
    at least one token and one id. They keep a head from memorising its train queries (it fits them to cosine
    ~0.9 and unseen ones to ~0.75 without). Zero rates give the batch back unchanged."""
    out = dict(batch)
    mask = batch.get("mask")
    if span_dropout > 0 and mask is not None:
        keep = _kept(mask.bool(), span_dropout, generator)
        out["mask"] = keep
        ids = batch.get("span_ids")
        if ids is not None and ids.shape == keep.shape:  # the static branch reads the same positions
            out["span_ids"] = torch.where(keep, ids, torch.full_like(ids, -1))
    ids = out.get("span_ids")
    if token_dropout > 0 and ids is not None:
        out["span_ids"] = torch.where(_kept(ids >= 0, token_dropout, generator), ids, torch.full_like(ids, -1))
    if feature_dropout > 0:
        features = batch["features"]
        kept = torch.rand(features.shape, generator=generator, device="cpu").to(features.device) >= feature_dropout
        out["features"] = features * kept / (1 - feature_dropout)
    return out


def _kept(valid: torch.Tensor, rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """`valid` [B, L] with each True dropped with probability `rate`; a row whose every one was drawn keeps its
    first."""
    draw = torch.rand(valid.shape, generator=generator, device="cpu").to(valid.device)
    keep = valid & (draw >= rate)
    first = valid & (valid.cumsum(1) == 1)
    return keep | (first & ~keep.any(1, keepdim=True))


def on_device(device: Any, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors on `device` (None stays None)."""
    return [None if t is None else t.to(device) for t in tensors]


def loss_inputs(lo: Any, batch: dict[str, torch.Tensor], documents: torch.Tensor,
                accelerator: Any) -> dict[str, Any]:
    """`DistillationLoss` keyword arguments for a batch under the recipe's loss section `lo`: the rank loss's
    documents, the contrastive candidates (gathered from every process under DDP, or gold documents)."""
    kwargs: dict[str, Any] = {}
    if lo.rank > 0:
        kwargs["rank_documents"] = documents
        kwargs["top_k_indices"] = batch["top_k"]
    if lo.contrastive > 0 and not lo.gold_positives:
        from retrieval_head.training.losses import gathered_candidates, label_free_positives

        teacher, own = batch["teacher"], None
        if accelerator.num_processes > 1:
            teacher, own = gathered_candidates(batch["teacher"], accelerator.gather, accelerator.process_index)
        kwargs["candidates"], kwargs["positives"] = teacher, label_free_positives(batch["teacher"], teacher, own)
    if lo.contrastive > 0 and lo.gold_positives:
        gold = batch["gold"]
        ids = torch.unique(gold[gold >= 0])
        teacher = batch["teacher"]
        # candidates: the batch's teacher query vectors (each row's own = positive) + the batch's gold docs
        cands = torch.cat([teacher, documents[ids]]) if ids.numel() else teacher
        mask = torch.zeros((gold.shape[0], cands.shape[0]), dtype=torch.bool, device=teacher.device)
        mask[torch.arange(gold.shape[0]), torch.arange(gold.shape[0])] = True
        if ids.numel():
            mask[:, gold.shape[0]:] = (gold.unsqueeze(2) == ids.view(1, 1, -1)).any(dim=1)
        kwargs["candidates"], kwargs["positives"] = cands, mask
        if lo.hard_negatives:
            top = batch["top_k"][:, : lo.hard_negatives + gold.shape[1]]
            is_gold = (top.unsqueeze(2) == gold.unsqueeze(1)).any(dim=2) | (top < 0)
            hard = torch.zeros((gold.shape[0], lo.hard_negatives, documents.shape[1]), device=teacher.device)
            for r in range(gold.shape[0]):
                picks = top[r][~is_gold[r]][: lo.hard_negatives]
                hard[r, : picks.numel()] = documents[picks]
            kwargs["hard_negatives"] = hard
    return kwargs
