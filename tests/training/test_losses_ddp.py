"""Label-free contrastive loss under DDP: negatives gathered from every rank give one process's gradients."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retrieval_head.training.losses import DistillationLoss, gathered_candidates

BATCH, DIM, IN = 8, 6, 5


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2 * BATCH, IN, generator=generator)
    teacher = torch.nn.functional.normalize(torch.randn(2 * BATCH, DIM, generator=generator), dim=-1)
    return features, teacher


def _head() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(IN, DIM)


def _loss(head: torch.nn.Linear, features: torch.Tensor, teacher: torch.Tensor, **kwargs) -> torch.Tensor:
    student = torch.nn.functional.normalize(head(features), dim=-1)
    return DistillationLoss({"alignment": 1.0, "contrastive": 1.0})(student, teacher, **kwargs)[0]


def _rank(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    features, teacher = _data()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)

    def gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    head = _head()
    candidates, positives = gathered_candidates(teacher[mine], gather, rank)
    _loss(head, features[mine], teacher[mine], candidates=candidates, positives=positives).backward()
    for p in head.parameters():  # what DDP does: average the gradients over the ranks
        dist.all_reduce(p.grad)
        p.grad /= 2
    out[rank] = [p.grad.clone() for p in head.parameters()]
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_with_gathered_negatives_equal_one_process_with_the_whole_batch() -> None:
    features, teacher = _data()
    single = _head()
    _loss(single, features, teacher).backward()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_rank, args=(_free_port(), out), nprocs=2, join=True)
    for rank in (0, 1):
        for got, want in zip(out[rank], single.parameters(), strict=True):
            assert torch.allclose(got, want.grad, atol=1e-6)
    local = _head()  # DDP without gathering: each rank's negatives are its own half, gradients averaged
    for half in (slice(0, BATCH), slice(BATCH, 2 * BATCH)):
        (_loss(local, features[half], teacher[half]) / 2).backward()
    assert not torch.allclose(local.weight.grad, single.weight.grad, atol=1e-4)
