from pathlib import Path

import pytest

from retrieval_head.training.recipe import (
    Recipe,
    RecipeError,
    RecipeMismatchError,
    check_resumable,
    diff_recipes,
)

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"


def test_shipped_recipes_load_and_default_matches_code():
    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert "smollm2-135m-minilm.yaml" in names and "qwen3-8b-qwen3-embedding-8b.yaml" in names
    for path in RECIPES.glob("*.yaml"):
        Recipe.load(path)
    assert diff_recipes(Recipe.load(RECIPES / "smollm2-135m-minilm.yaml"), Recipe()) == {}


def test_yaml_round_trip_and_float_strings(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain:\n  lr: 2e-4\n  max_steps: 10\n")
    recipe = Recipe.load(path)
    assert recipe.train.lr == pytest.approx(2e-4) and recipe.train.max_steps == 10
    recipe.save(tmp_path / "again.yaml")
    assert diff_recipes(recipe, Recipe.load(tmp_path / "again.yaml")) == {}


@pytest.mark.parametrize("text, words", [
    ("trian:\n  lr: 1.0\n", ["trian"]),
    ("train:\n  learning_rate: 1.0\n", ["train.learning_rate"]),
    ("head:\n  pooling: max\n", ["head.pooling", "max"]),
    ("head:\n  head_type: lstm\n", ["head.head_type"]),
    ("train:\n  max_steps: 0\n", ["train.max_steps"]),
    ("train:\n  batch_size: 8.5\n", ["train.batch_size"]),
    ("loss:\n  alignment: 0\n  contrastive: 0\n  rank: 0\n", ["loss weights"]),
    ("loss:\n  hard_negatives: 4\n", ["loss.hard_negatives", "gold_positives"]),
    ("data:\n  eval_datasets: [nope]\n", ["data.eval_datasets"]),
    ("head:\n  pooling: last_token\nfeatures:\n  poolings: [mean]\n", ["head.pooling"]),
    ("train: [1, 2]\n", ["train"]),
    ("head: {head_type: transformer}\nfeatures: {token_layer: null}\n", ["features.token_layer"]),
    ("head: {pooling: attention}\nfeatures: {token_layer: null}\n", ["features.token_layer", "attention"]),
    ("features: {poolings: [mean, attention]}\n", ["features.poolings"]),
    ("data:\n  oversample: {scifact_train: 0}\n", ["data.oversample"]),
    ("data:\n  oversample: [scifact_train]\n", ["data.oversample", "mapping"]),
    ("data:\n  datasets: [covidqa]\n  eval_datasets: [covidqa]\n", ["data.oversample", "data.datasets"]),
])
def test_invalid_recipes_name_the_key(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        Recipe.load(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_not_yaml_and_missing_file(tmp_path):
    (tmp_path / "x.yaml").write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(tmp_path / "x.yaml")
    with pytest.raises(FileNotFoundError):
        Recipe.load(tmp_path / "missing.yaml")


def test_diff_and_resume_check():
    a = Recipe()
    b = a.replace(**{"train.lr": 5e-4, "head.layer": 27, "train.log_every": 1})
    assert diff_recipes(a, b) == {"head.layer": (24, 27), "train.log_every": (10, 1), "train.lr": (2e-4, 5e-4)}
    check_resumable(a, a.replace(**{"train.log_every": 1, "features.cache_dir": "/elsewhere"}), "run")
    with pytest.raises(RecipeMismatchError) as err:
        check_resumable(a, b, "out/run")
    assert "train.lr: 0.0002 -> 0.0005" in str(err.value) and "head.layer: 24 -> 27" in str(err.value)
    assert "log_every" not in str(err.value)


def test_head_section_is_the_config_schema_with_the_recipe_defaults() -> None:
    from dataclasses import fields

    from retrieval_head import RetrievalHeadConfig
    from retrieval_head.training.recipe import HEAD_DEFAULTS, HeadSpec

    config = {f.name: f for f in fields(RetrievalHeadConfig)}
    for f in fields(HeadSpec):
        assert f.metadata["help"] == config[f.name].metadata["help"]  # one help text, from the config
        assert f.default == HEAD_DEFAULTS.get(f.name, config[f.name].default), f.name
    assert HeadSpec().layer == 24 and RetrievalHeadConfig().layer == -1


def test_parse_overrides_reads_yaml_values_and_names_a_bad_item() -> None:
    from retrieval_head.training.recipe import parse_overrides

    values = parse_overrides(["train.lr=1e-4", "data.datasets=[scifact_train]", "head.system_prompt=null"])
    assert values["data.datasets"] == ["scifact_train"] and values["head.system_prompt"] is None
    recipe = Recipe().replace(**values, **{"data.eval_datasets": ["scifact_train"], "data.oversample": {}})
    assert recipe.train.lr == 1e-4 and recipe.data.datasets == ["scifact_train"]
    for bad in ("train.lr", "lr=1e-4"):
        with pytest.raises(RecipeError, match="SECTION.KEY=VALUE"):
            parse_overrides([bad])
