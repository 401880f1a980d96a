"""Teacher embeddings: batched by token count, the same vectors in the texts' order."""

from __future__ import annotations

from pathlib import Path

import torch
from eval_helpers import load_teacher, write_teacher

from retrieval_head.retrieval import teacher as teacher_module
from retrieval_head.retrieval.teacher import encode_by_length

TEXTS = ["a", "the place with a fox and a dog and a capital of france", "mitochondria", "i want it",
         "does it have a place", "sure", "what would you like to know about the capital of france", "dog"]


def test_batches_by_token_count_give_the_plain_encode_vectors_in_order(tmp_path: Path, monkeypatch) -> None:
    teacher = load_teacher(write_teacher(tmp_path / "teacher"))
    batches: list[list[int]] = []

    def encode(texts, **kwargs):
        batches.append([len(teacher.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts])
        return teacher.encode(texts, **kwargs)

    monkeypatch.setattr(teacher_module, "MAX_BATCH_TOKENS", 24)
    ours = encode_by_length(teacher, encode, TEXTS, batch_size=3)
    plain = torch.as_tensor(teacher.encode(TEXTS, batch_size=3, convert_to_numpy=True))
    assert torch.allclose(ours, plain, atol=1e-6)
    assert sorted(n for b in batches for n in b) == [n for b in batches for n in b]  # shortest first
    assert all(len(b) <= 3 and len(b) * (max(b) + 2) <= 24 for b in batches)  # both limits hold
    assert len(batches) > len(TEXTS) // 3  # the long texts' batches were cut to the token budget


def test_a_teacher_without_a_tokenizer_is_encoded_as_given(tmp_path: Path) -> None:
    teacher = load_teacher(write_teacher(tmp_path / "teacher"))

    class Bare:
        def encode(self, texts, **kwargs):
            return teacher.encode(texts, **kwargs)

    ours = encode_by_length(Bare(), Bare().encode, TEXTS, batch_size=4)
    assert torch.allclose(ours, torch.as_tensor(teacher.encode(TEXTS, convert_to_numpy=True)), atol=1e-6)
