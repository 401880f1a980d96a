"""The static branch's lexical start: the teacher's token vectors, PCA-reduced, and a ridge-fitted output map."""

from __future__ import annotations

import torch
from tiny import tiny_tokenizer
from training_helpers import FakeTeacher, tiny_models, tiny_recipe

from retrieval_head.io.tensor_cache import TensorCache
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.training.lexical_init import (
    fit_output_map,
    lexical_rows,
    teacher_token_rows,
    token_strings,
)
from retrieval_head.training.trainer import train


def run(recipe, out):
    base, tok, teacher = tiny_models()
    return train(recipe, out, base=base, tokenizer=tok, teacher=teacher, show_progress_bar=False)


def test_lexical_rows_keep_the_largest_directions_of_the_teacher_vectors():
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0]
    scales = torch.tensor([8.0, 4.0] + [0.01] * 14)
    rows = (torch.randn(500, 16, generator=generator) * scales) @ basis.T
    table = lexical_rows(rows, 2)
    assert table.shape == (500, 2)
    centred = rows - rows.mean(0)
    kept = table.pow(2).sum() / centred.pow(2).sum()
    assert kept > 0.99  # two directions hold almost all the variance; a random pair would keep ~1/8
    assert torch.equal(table, lexical_rows(rows, 2))  # the random PCA sketch is seeded


def test_a_table_wider_than_the_teacher_keeps_every_component_then_small_noise():
    rows = torch.randn(100, 16, generator=torch.Generator().manual_seed(4))
    table = lexical_rows(rows, 24)
    assert table.shape == (100, 24)
    centred = rows - rows.mean(0)
    assert torch.allclose(table[:, :16].pow(2).sum(), centred.pow(2).sum(), rtol=1e-4)  # a rotation: all kept
    assert table[:, 16:].abs().max() < 0.2


def test_fit_output_map_recovers_a_linear_map():
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(2))
    true = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(fit_output_map(x, x @ true.T, ridge=1e-6), true, atol=1e-4)


def test_teacher_token_rows_embed_each_token_string_and_are_cached(tmp_path):
    tokenizer, teacher = tiny_tokenizer(chat=False), FakeTeacher()
    fingerprint = TeacherFingerprint.from_sentence_transformer(teacher, teacher_id="fake/teacher")
    strings = token_strings(tokenizer, len(tokenizer) + 2)
    assert strings[-2:] == ["", ""] and strings[5] == tokenizer.decode([5])
    cache = TensorCache(tmp_path)
    rows = teacher_token_rows(teacher, tokenizer, 40, fingerprint, cache, show_progress_bar=False)
    assert rows.shape == (40, 16)
    assert torch.allclose(rows[7], torch.as_tensor(teacher.encode([tokenizer.decode([7])]))[0])
    teacher.table.zero_()  # a cache hit must not call the teacher again
    assert torch.equal(teacher_token_rows(teacher, tokenizer, 40, fingerprint, cache, show_progress_bar=False), rows)


def test_a_lexically_initialised_branch_starts_as_a_static_retriever_and_trains(tmp_path, monkeypatch):
    import retrieval_head.training.lexical_init as lexical_init

    started = {}
    original = lexical_init.init_static_branch

    def spy(head, *args, **kwargs):
        original(head, *args, **kwargs)
        started["table"] = head.static.weight.detach().clone()
        started["out"] = head.static_out.weight.detach().clone()

    monkeypatch.setattr(lexical_init, "init_static_branch", spy)
    recipe = tiny_recipe(tmp_path).replace(**{"head.static_dim": 4, "train.max_steps": 6,
                                              "train.static_init": "lexical"})
    run(recipe, tmp_path / "out")
    assert started["out"].abs().sum() > 0  # ridge-fitted, not the random start's zeros
    assert started["table"].std() > 0.05  # teacher vectors, not the normal(0, 0.02) noise
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out/retrieval_head.safetensors"))
    assert not torch.equal(saved["static.weight"], started["table"])  # and training moved it on


def test_a_frozen_table_keeps_its_lexical_start(tmp_path):
    recipe = tiny_recipe(tmp_path).replace(**{"head.static_dim": 4, "train.max_steps": 4,
                                              "train.static_init": "lexical", "train.static_lr_scale": 0.0,
                                              "train.weight_decay": 0.0})
    run(recipe, tmp_path / "out")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out/retrieval_head.safetensors"))
    teacher = FakeTeacher()
    fingerprint = TeacherFingerprint.from_sentence_transformer(teacher, teacher_id="fake/teacher")
    rows = teacher_token_rows(teacher, tiny_tokenizer(chat=True), 300, fingerprint, None, show_progress_bar=False)
    # the saved table is rounded through float16 (stored as such): equal to the start up to that rounding
    assert torch.allclose(saved["static.weight"].float(), lexical_rows(rows, 4), atol=2e-3)
    assert not torch.equal(saved["static.weight"].float(), torch.zeros(300, 4))


def test_a_lexical_start_with_the_base_embedding_view_fits_its_map_over_both(tmp_path):
    recipe = tiny_recipe(tmp_path).replace(**{"head.static_dim": 4, "head.static_base_embeddings": True,
                                              "train.max_steps": 4, "train.static_init": "lexical"})
    run(recipe, tmp_path / "out")
    from safetensors.torch import load_file

    from retrieval_head import RetrievalHeadConfig

    saved = load_file(str(tmp_path / "out/retrieval_head.safetensors"))
    assert saved["static_out.weight"].shape == (16, 4 + 32)
    assert saved["static_out.weight"][:, 4:].abs().sum() > 0
    assert RetrievalHeadConfig.from_json_file(tmp_path / "out/config.json").static_base_embeddings
