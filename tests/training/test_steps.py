"""The training step's pieces: the optimizer (`adamw`) and the input regularizers (`regularize`)."""

import pytest
import torch

from retrieval_head.training.recipe import Recipe, RecipeError
from retrieval_head.training.steps import EpochOrder, adamw, regularize


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, -1, -1], [9, -1, -1, -1, -1, -1], [1, 2, 3, 4, 5, 6]])
    return {"features": torch.randn(3, 16), "span_ids": ids, "teacher": torch.randn(3, 4)}


def test_zero_rates_give_the_batch_back_unchanged():
    batch = _batch()
    out = regularize(batch, 0.0, 0.0)
    assert out["features"] is batch["features"] and out["span_ids"] is batch["span_ids"]


def test_token_dropout_drops_ids_but_never_a_whole_row_and_never_invents_one():
    batch = _batch()
    generator = torch.Generator().manual_seed(0)
    dropped = 0
    for _ in range(200):
        ids = regularize(batch, 0.9, 0.0, generator)["span_ids"]
        assert ((ids >= 0).sum(1) >= 1).all()  # every row keeps at least one id
        kept = ids[ids >= 0]
        assert set(kept.tolist()) <= set(batch["span_ids"][batch["span_ids"] >= 0].tolist())
        assert ((ids == batch["span_ids"]) | (ids == -1)).all()  # ids stay in place
        dropped += int(((batch["span_ids"] >= 0) & (ids < 0)).sum())
    assert dropped > 0.8 * 200 * 10 * 0.9 * 0.8  # most of the 10 droppable ids go at p=0.9


def test_feature_dropout_zeroes_a_fraction_and_rescales_the_rest():
    batch = {"features": torch.ones(64, 256)}
    out = regularize(batch, 0.0, 0.25, torch.Generator().manual_seed(0))["features"]
    zero = (out == 0).float().mean().item()
    assert 0.2 < zero < 0.3
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))
    assert torch.equal(batch["features"], torch.ones(64, 256))  # the cached batch is not changed in place


def test_span_dropout_leaves_tokens_out_of_the_pooling_with_their_ids_and_keeps_one_per_row():
    ids = torch.tensor([[5, 6, 7, 8, -1, -1], [9, -1, -1, -1, -1, -1]])
    batch = {"features": torch.randn(2, 6, 8), "mask": ids >= 0, "span_ids": ids}
    generator = torch.Generator().manual_seed(0)
    dropped = 0
    for _ in range(100):
        out = regularize(batch, 0.0, 0.0, generator, span_dropout=0.5)
        assert (out["mask"].sum(1) >= 1).all() and not (out["mask"] & ~batch["mask"]).any()
        assert torch.equal(out["span_ids"] >= 0, out["mask"])  # a dropped token's id goes with it
        assert out["features"] is batch["features"]  # the states stay; the mask leaves them out
        dropped += int((batch["mask"] & ~out["mask"]).sum())
    assert 100 * 5 * 0.5 * 0.7 < dropped < 100 * 5 * 0.5 * 1.3
    assert regularize({"features": torch.randn(2, 8)}, 0.0, 0.0, span_dropout=0.5)["features"].shape == (2, 8)


@pytest.mark.parametrize("name", ["token_dropout", "span_dropout", "feature_dropout"])
def test_rates_outside_zero_one_are_refused(name):
    with pytest.raises(RecipeError, match=f"train.{name}"):
        Recipe().replace(**{f"train.{name}": 1.0}).validate()


def test_adamw_is_fused_and_steps_as_the_reference_adamw():
    torch.manual_seed(0)
    head = torch.nn.Module()
    head.static = torch.nn.Embedding(50, 8)
    head.project = torch.nn.Linear(8, 4)
    reference = {k: torch.nn.Parameter(v.detach().clone()) for k, v in head.named_parameters()}
    fused = adamw(head, 1e-2, 10.0, 0.01)
    assert all(group["fused"] for group in fused.param_groups)
    assert [g["lr"] for g in fused.param_groups] == [1e-2, 1e-1]  # the table at lr x static_lr_scale
    plain = torch.optim.AdamW([{"params": [reference["project.weight"], reference["project.bias"]], "lr": 1e-2},
                               {"params": [reference["static.weight"]], "lr": 1e-1}], weight_decay=0.01)
    for _ in range(3):
        for name, p in head.named_parameters():
            grad = torch.randn_like(p)
            p.grad, reference[name].grad = grad, grad.clone()
        fused.step()
        plain.step()
    for name, p in head.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name].detach(), atol=1e-6, rtol=1e-5)


def test_per_dataset_order_makes_single_dataset_batches_of_a_permutation():
    groups = [0] * 70 + [1] * 45 + [2] * 5  # 120 rows, batches of 16
    order = EpochOrder(len(groups), seed=3, groups=groups, batch_size=16)
    rows = [order[i] for i in range(len(order))]
    assert sorted(rows) == list(range(120))  # every row once an epoch
    batches = [rows[i : i + 16] for i in range(0, 112, 16)]
    pure = [b for b in batches if len({groups[r] for r in b}) == 1]
    assert len(pure) == 70 // 16 + 45 // 16  # 4 + 2 full batches of one dataset; the leftovers fill the rest
    assert {groups[b[0]] for b in pure} == {0, 1}
    again = EpochOrder(len(groups), seed=3, groups=groups, batch_size=16)
    assert [again[i] for i in range(120)] == rows  # seeded: a resumed run sees the same order
    order.use_epoch(1)
    assert [order[i] for i in range(120)] != rows
    with pytest.raises(ValueError, match="one id per example"):
        EpochOrder(10, seed=0, groups=[0] * 9, batch_size=4)
