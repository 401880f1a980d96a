import json

from training_helpers import tiny_models, tiny_recipe

from retrieval_head.training.main_job import main_recipe, run_main_job
from retrieval_head.training.recipe import Recipe
from retrieval_head.training.trainer import train


def test_main_recipe_is_the_default_split_on_a_sample():
    recipe, default = main_recipe(), Recipe()
    assert recipe.data.datasets == ["dstc11_track5_val_reviewdoc", "scifact_train"]
    assert (recipe.data.dev_fraction, recipe.data.test_fraction, recipe.data.split_seed) == (
        default.data.dev_fraction, default.data.test_fraction, default.data.split_seed)  # shipped head held out
    assert recipe.data.max_train_queries and recipe.data.max_test_queries
    assert main_recipe(**{"train.max_steps": 5}).train.max_steps == 5


def test_main_job_reports_fresh_and_shipped_heads(tmp_path, capsys, monkeypatch):
    recipe = tiny_recipe(tmp_path).replace(**{"train.max_steps": 4})
    base, tok, teacher = tiny_models()
    train(recipe, tmp_path / "shipped", base=base, tokenizer=tok, teacher=teacher, show_progress_bar=False)
    main = recipe.replace(**{"name": "tiny-main", "data.max_test_queries": 8, "data.max_train_queries": 20})
    monkeypatch.chdir(tmp_path)  # the shipped head named as the main job names it: relative to where it runs
    report = run_main_job(tmp_path / "fresh", "shipped", main, show_progress_bar=False,
                          base=base, tokenizer=tok, teacher=teacher)
    out = capsys.readouterr().out
    assert "fresh head" in out and "shipped head" in out and "wall time" in out
    assert report["shipped"]["tiny"]["queries"] == report["fresh"]["tiny"]["queries"] <= 8
    written = (tmp_path / "fresh/main_report.json").read_text()
    assert json.loads(written)["recipe"] == "tiny-main" and json.loads(written)["shipped_folder"] == "shipped"
    assert str(tmp_path) not in written  # no machine path in what a user may commit
    assert (tmp_path / "fresh/retrieval_head.safetensors").is_file()
    # a second main job replaces the first one's folder
    run_main_job(tmp_path / "fresh", tmp_path / "missing", main, show_progress_bar=False,
                 base=base, tokenizer=tok, teacher=teacher)
    assert "shipped head: not found" in capsys.readouterr().out
