"""Tests for retrieval_head.training.losses: hand-computed values, gradients, invariances and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retrieval_head.training.losses import (
    AlignmentLoss,
    ContrastiveLoss,
    DistillationLoss,
    RankDistillationLoss,
    positives_to_mask,
)

E = math.e


def t(rows: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, requires_grad=grad)


# Unit vectors, so cosine similarity is the plain dot product.
Q = [[1.0, 0.0], [0.0, 1.0]]
D = [[1.0, 0.0], [0.6, 0.8]]
# cos(q1, d1) = 1.0, cos(q1, d2) = 0.6, cos(q2, d1) = 0.0, cos(q2, d2) = 0.8


# ----------------------------------------------------------------------------- alignment


def test_alignment_cosine_hand_computed() -> None:
    student = t([[1.0, 0.0], [0.0, 2.0]])
    teacher = t([[3.0, 0.0], [1.0, 1.0]])
    # row 1: cos = 1 -> 0; row 2: cos = 1/sqrt(2) -> 1 - 1/sqrt(2)
    expected = (0.0 + (1.0 - 1.0 / math.sqrt(2.0))) / 2.0
    assert AlignmentLoss("cosine")(student, teacher).item() == pytest.approx(expected, abs=1e-6)


def test_alignment_mse_hand_computed() -> None:
    student = t([[1.0, 2.0], [0.0, 0.0]])
    teacher = t([[0.0, 0.0], [0.0, 1.0]])
    expected = (1.0 + 4.0 + 0.0 + 1.0) / 4.0
    assert AlignmentLoss("mse")(student, teacher).item() == pytest.approx(expected, abs=1e-6)


def test_alignment_gradient_only_to_student_and_bad_input() -> None:
    student = t(Q, grad=True)
    teacher = t(D, grad=True)
    AlignmentLoss()(student, teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    with pytest.raises(ValueError, match="kind"):
        AlignmentLoss("l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shapes differ"):
        AlignmentLoss()(t(Q), t([[1.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- contrastive


def test_contrastive_hand_computed_two_by_two() -> None:
    temperature = 0.5  # scores are doubled
    loss = ContrastiveLoss(temperature)(t(Q), t(D), torch.tensor([0, 1]))
    row1 = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(1.2)))
    row2 = -math.log(math.exp(1.6) / (math.exp(0.0) + math.exp(1.6)))
    assert loss.item() == pytest.approx((row1 + row2) / 2.0, abs=1e-5)


def test_contrastive_index_forms_agree() -> None:
    loss_fn = ContrastiveLoss(1.0)
    by_index = loss_fn(t(Q), t(D), torch.tensor([0, 1]))
    by_padded = loss_fn(t(Q), t(D), torch.tensor([[0, -1], [1, -1]]))
    by_mask = loss_fn(t(Q), t(D), torch.tensor([[True, False], [False, True]]))
    diagonal = loss_fn(t(Q), t(D), None)
    for other in (by_padded, by_mask, diagonal):
        assert other.item() == pytest.approx(by_index.item(), abs=1e-6)


def test_contrastive_multi_positive_hand_computed() -> None:
    docs = t(D + [[-1.0, 0.0]])  # third candidate: cos(q1, d3) = -1, cos(q2, d3) = 0
    positives = torch.tensor([[0, 1], [1, -1]])
    loss = ContrastiveLoss(1.0)(t(Q), docs, positives)
    row1 = -math.log((E**1.0 + E**0.6) / (E**1.0 + E**0.6 + E**-1.0))
    row2 = -math.log(E**0.8 / (E**0.0 + E**0.8 + E**0.0))
    assert loss.item() == pytest.approx((row1 + row2) / 2.0, abs=1e-5)


def test_contrastive_hard_negatives_shared_and_per_query() -> None:
    hard = t([[-1.0, 0.0]])
    shared = ContrastiveLoss(1.0)(t(Q), t(D), torch.tensor([0, 1]), hard_negatives=hard)
    row1 = -math.log(E**1.0 / (E**1.0 + E**0.6 + E**-1.0))
    row2 = -math.log(E**0.8 / (E**0.0 + E**0.8 + E**0.0))
    assert shared.item() == pytest.approx((row1 + row2) / 2.0, abs=1e-5)

    # Per-query: q1 gets [-1, 0] (cos -1), q2 gets [0, -1] (cos -1) plus an all-zero padding row.
    per_query = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]], [[0.0, -1.0], [0.0, 0.0]]])
    loss = ContrastiveLoss(1.0)(t(Q), t(D), torch.tensor([0, 1]), hard_negatives=per_query)
    row2 = -math.log(E**0.8 / (E**0.0 + E**0.8 + E**-1.0))
    assert loss.item() == pytest.approx((row1 + row2) / 2.0, abs=1e-5)


def test_contrastive_ignored_rows() -> None:
    loss_fn = ContrastiveLoss(1.0)
    only_first = loss_fn(t(Q), t(D), torch.tensor([0, -1]))
    assert only_first.item() == pytest.approx(-math.log(E / (E + E**0.6)), abs=1e-5)

    student = t(Q, grad=True)
    none = loss_fn(student, t(D), torch.tensor([-1, -1]))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert student.grad is not None and torch.equal(student.grad, torch.zeros_like(student.grad))


def test_contrastive_gradient_only_to_student() -> None:
    student = t(Q, grad=True)
    docs = t(D, grad=True)
    hard = t([[-1.0, 0.0]], grad=True)
    ContrastiveLoss()(student, docs, torch.tensor([1, 0]), hard_negatives=hard).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert docs.grad is None and hard.grad is None


def test_contrastive_decreases_when_positive_score_rises() -> None:
    loss_fn = ContrastiveLoss(0.05)
    docs = t([[1.0, 0.0], [0.0, 1.0]])
    previous = math.inf
    for angle in (1.2, 0.9, 0.6, 0.3, 0.0):  # query rotates towards its positive d1
        query = torch.tensor([[math.cos(angle), math.sin(angle)]])
        value = loss_fn(query, docs, torch.tensor([0])).item()
        assert value < previous
        previous = value


def test_contrastive_bad_positives() -> None:
    with pytest.raises(ValueError, match="positive indices"):
        ContrastiveLoss()(t(Q), t(D), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="mask"):
        ContrastiveLoss()(t(Q), t(D), torch.tensor([[True, False, True]]))
    with pytest.raises(ValueError, match="candidates"):
        positives_to_mask(None, batch_size=3, num_candidates=2)
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(0.0)


# ----------------------------------------------------------------------------- rank distillation


def test_rank_hand_computed() -> None:
    # Query 1: teacher [1,0], student [0,1] over docs e1, e2 with T = 1.
    #   p_t = [e, 1] / (e + 1), p_s = [1, e] / (e + 1)
    #   KL = p_t1 * log(e) + p_t2 * log(1/e) = (e - 1) / (e + 1)
    # Query 2: student == teacher -> KL = 0.
    docs = t([[1.0, 0.0], [0.0, 1.0]])
    student = t([[0.0, 1.0], [0.6, 0.8]])
    teacher = t([[1.0, 0.0], [0.6, 0.8]])
    indices = torch.tensor([[0, 1], [1, 0]])
    loss = RankDistillationLoss(temperature=1.0, top_k=2)(student, teacher, docs, indices)
    assert loss.item() == pytest.approx(((E - 1.0) / (E + 1.0) + 0.0) / 2.0, abs=1e-6)


def test_rank_matches_kl_div_reference_and_document_forms() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    docs = torch.randn(10, 8, generator=gen)
    loss_fn = RankDistillationLoss(temperature=0.1, top_k=4)

    # Without indices: the teacher's top-4 docs are selected inside.
    auto = loss_fn(student, teacher, docs)
    nd, ns, nt = F.normalize(docs, dim=-1), F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    idx = (nt @ nd.T).topk(4, dim=1).indices
    per_query = docs[idx]  # [3, 4, 8]
    s_scores = torch.einsum("bd,bkd->bk", ns, F.normalize(per_query, dim=-1)) / 0.1
    t_scores = torch.einsum("bd,bkd->bk", nt, F.normalize(per_query, dim=-1)) / 0.1
    reference = F.kl_div(
        s_scores.log_softmax(1), t_scores.log_softmax(1), log_target=True, reduction="batchmean"
    )
    assert auto.item() == pytest.approx(reference.item(), abs=1e-5)

    # Explicit indices (longer than top_k, cut to the first 4) and per-query docs give the same value.
    longer = torch.cat([idx, torch.zeros(3, 2, dtype=torch.long)], dim=1)
    assert loss_fn(student, teacher, docs, longer).item() == pytest.approx(reference.item(), abs=1e-5)
    assert loss_fn(student, teacher, per_query).item() == pytest.approx(reference.item(), abs=1e-5)


def test_rank_padding_equals_shorter_list() -> None:
    docs = t([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    student, teacher = t([[0.0, 1.0]]), t([[1.0, 0.0]])
    loss_fn = RankDistillationLoss(temperature=1.0, top_k=3)
    padded = loss_fn(student, teacher, docs, torch.tensor([[0, 1, -1]]))
    assert padded.item() == pytest.approx((E - 1.0) / (E + 1.0), abs=1e-6)


def test_rank_zero_when_student_scores_equal_teacher_scores() -> None:
    gen = torch.Generator().manual_seed(1)
    teacher, docs = torch.randn(4, 16, generator=gen), torch.randn(20, 16, generator=gen)
    student = (3.0 * teacher).requires_grad_(True)  # same direction -> identical cosine scores
    loss = RankDistillationLoss(temperature=0.05, top_k=5)(student, teacher, docs)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_rank_gradient_only_to_student() -> None:
    student = t([[0.0, 1.0]], grad=True)
    teacher = t([[1.0, 0.0]], grad=True)
    docs = t([[1.0, 0.0], [0.6, 0.8]], grad=True)
    RankDistillationLoss(temperature=1.0)(student, teacher, docs).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and docs.grad is None


def test_rank_bad_input() -> None:
    with pytest.raises(ValueError, match="top_k"):
        RankDistillationLoss(top_k=0)
    with pytest.raises(ValueError, match="top_k_indices"):
        RankDistillationLoss()(t(Q), t(Q), t(D), torch.tensor([[0, 5], [0, 1]]))


# ----------------------------------------------------------------------------- weighted sum


def test_distillation_weighted_sum_hand_computed() -> None:
    student, teacher = t([[0.0, 1.0], [0.6, 0.8]]), t([[1.0, 0.0], [0.6, 0.8]])
    docs = t([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([0, 1])
    loss_fn = DistillationLoss(
        {"alignment": 1.0, "contrastive": 0.5, "rank": 2.0},
        contrastive_temperature=1.0,
        rank_temperature=1.0,
        top_k=2,
    )
    total, parts = loss_fn(student, teacher, candidates=docs, positives=positives)
    alignment = (1.0 - 0.0 + 1.0 - 1.0) / 2.0
    contrastive = (-math.log(E**0.0 / (E**0.0 + E**1.0)) - math.log(E**0.8 / (E**0.6 + E**0.8))) / 2.0
    rank = ((E - 1.0) / (E + 1.0) + 0.0) / 2.0
    assert parts["alignment"] == pytest.approx(alignment, abs=1e-6)
    assert parts["contrastive"] == pytest.approx(contrastive, abs=1e-5)
    assert parts["rank"] == pytest.approx(rank, abs=1e-6)
    expected_total = 1.0 * alignment + 0.5 * contrastive + 2.0 * rank
    assert total.item() == pytest.approx(expected_total, abs=1e-5)
    assert parts["total"] == pytest.approx(expected_total, abs=1e-5)
    assert all(isinstance(value, float) for value in parts.values())


def test_distillation_zero_weight_skips_and_label_free_contrastive() -> None:
    student, teacher = t(Q, grad=True), t(D)
    # rank has weight 0, so it needs no documents and is not computed.
    total, parts = DistillationLoss({"alignment": 1.0, "contrastive": 1.0})(student, teacher)
    assert set(parts) == {"alignment", "contrastive", "total"}
    label_free = ContrastiveLoss()(t(Q), t(D), torch.arange(2)).item()
    assert parts["contrastive"] == pytest.approx(label_free, abs=1e-6)
    total.backward()
    assert student.grad is not None

    _, parts = DistillationLoss({"alignment": 1.0})(t(Q), t(D))
    assert set(parts) == {"alignment", "total"}
    assert DistillationLoss().weights == {"alignment": 1.0, "contrastive": 0.1, "rank": 0.1}


def test_distillation_bad_weights() -> None:
    with pytest.raises(ValueError, match="unknown loss name"):
        DistillationLoss({"alignment": 1.0, "kl": 0.1})
    with pytest.raises(ValueError, match="all loss weights are zero"):
        DistillationLoss({"alignment": 0.0, "rank": 0})
    with pytest.raises(ValueError, match="rank"):
        DistillationLoss({"alignment": 1.0, "rank": -0.1})
    with pytest.raises(ValueError, match="weight for 'alignment'"):
        DistillationLoss({"alignment": float("nan")})
    with pytest.raises(ValueError, match="rank_documents"):
        DistillationLoss({"rank": 1.0})(t(Q), t(Q))


def test_distillation_non_finite_names_the_part() -> None:
    nan_student = t([[float("nan"), 0.0], [0.0, 1.0]])
    with pytest.raises(FloatingPointError, match="alignment"):
        DistillationLoss({"alignment": 1.0, "contrastive": 0.1})(nan_student, t(D))
    nan_docs = t([[float("nan"), 0.0], [0.0, 1.0]])
    with pytest.raises(FloatingPointError, match="contrastive"):
        DistillationLoss({"alignment": 1.0, "contrastive": 0.1})(t(Q), t(D), candidates=nan_docs)
    with pytest.raises(FloatingPointError, match="rank"):
        DistillationLoss({"alignment": 1.0, "rank": 0.1})(t(Q), t(D), rank_documents=nan_docs)


def test_label_free_positives_make_a_repeated_text_a_positive_not_a_negative() -> None:
    from retrieval_head.training.losses import label_free_positives

    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.6, 0.8]])  # rows 0 and 2: the same text
    mask = label_free_positives(teacher, teacher)
    assert mask.tolist() == [[True, False, True, False], [False, True, False, False],
                             [True, False, True, False], [False, False, False, True]]
    everyone = torch.cat([torch.tensor([[0.0, 1.0], [1.0, 0.0]]), teacher])  # another rank's rows first
    mask = label_free_positives(teacher, everyone, own=torch.arange(4) + 2)
    assert mask[0].tolist() == [False, True, True, False, True, False]
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], requires_grad=True)
    plain = ContrastiveLoss(0.05)(student, teacher)
    fixed = ContrastiveLoss(0.05)(student, teacher, label_free_positives(teacher, teacher))
    assert fixed < plain - 0.3  # a duplicate as a negative holds the loss near log 2 for a perfect student
