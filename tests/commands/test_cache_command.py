"""`retrieval-head cache --recipe R.yaml`: fills exactly the caches `train` reads, then training computes nothing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from training_helpers import tiny_models, tiny_recipe

import retrieval_head.training.features as features
from retrieval_head.cli import main
from retrieval_head.training import setup as training_setup
from retrieval_head.training import train
from retrieval_head.training.datasets import plan_sources


def test_cache_then_train_runs_no_lm_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    recipe = tiny_recipe(tmp_path).replace(**{"train.max_steps": 1, "data.corpus_texts": 5})
    recipe.save(tmp_path / "recipe.yaml")
    monkeypatch.setattr(training_setup, "load_models", lambda recipe, device=None: tiny_models())
    assert main(["cache", "--recipe", str(tmp_path / "recipe.yaml"), "--quiet"]) == 0
    assert "texts of 2 sources" in capsys.readouterr().out
    shards = list((tmp_path / "cache").glob("features-*/shard-*.safetensors"))
    assert shards
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: pytest.fail("LM pass not cached"))
    base, tok, teacher = tiny_models()
    result = train(recipe, tmp_path / "out", base=base, tokenizer=tok, teacher=teacher, show_progress_bar=False)
    assert result.steps == 1


def test_a_bad_override_is_a_clear_error(tmp_path: Path, capsys) -> None:
    tiny_recipe(tmp_path).save(tmp_path / "recipe.yaml")
    assert main(["cache", "--recipe", str(tmp_path / "recipe.yaml"), "--set", "data.corpus_texts=-1"]) == 2
    assert "data.corpus_texts" in capsys.readouterr().err


def test_under_accelerate_each_process_builds_its_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys) -> None:
    import accelerate

    recipe = tiny_recipe(tmp_path).replace(**{"data.corpus_texts": 5})
    recipe.save(tmp_path / "recipe.yaml")
    monkeypatch.setattr(training_setup, "load_models", lambda recipe, device=None: tiny_models())
    built: list[int] = []
    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda m, items, *a, **k: built.append(len(items))
                        or real(m, items, *a, **k))
    shards = tmp_path / "cache"
    for rank in (1, 0):  # the second process first: it builds only its share and reports nothing
        state = SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0, device="cpu",
                                wait_for_everyone=lambda: None)
        monkeypatch.setattr(accelerate, "PartialState", lambda state=state: state)
        assert main(["cache", "--recipe", str(tmp_path / "recipe.yaml"), "--quiet"]) == 0
        if rank == 1:
            assert built == [5] and len(list(shards.glob("features-*/shard-*.safetensors"))) == 1  # the corpus
            assert "texts of" not in capsys.readouterr().out
    assert sum(built) == 5 + len(plan_sources(recipe)[0].items)  # every text once, over the two processes
    assert "texts of 2 sources" in capsys.readouterr().out
