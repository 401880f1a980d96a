"""Tests for retrieval_head.core.config: validation naming the field, JSON form, forward compatibility."""

from __future__ import annotations

import json
import logging
from dataclasses import fields

import pytest
from transformers import PretrainedConfig

import retrieval_head
from retrieval_head.core.config import CONFIG_NAME, HEAD_TYPES, MODEL_TYPE, POOLINGS, RetrievalHeadConfig


def own_field_names() -> set[str]:
    base = {f.name for f in fields(PretrainedConfig)}
    return {f.name for f in fields(RetrievalHeadConfig) if f.name not in base}


def test_defaults_are_valid_and_record_the_library_version() -> None:
    config = RetrievalHeadConfig()
    assert config.model_type == MODEL_TYPE == "retrieval_head"
    assert config.library_version == retrieval_head.__version__
    assert config.pooling in POOLINGS and config.head_type in HEAD_TYPES
    assert {"mean", "last_token"} <= set(POOLINGS)
    assert {"mlp", "transformer"} <= set(HEAD_TYPES)


def test_every_own_field_has_help_metadata() -> None:
    names = own_field_names()
    for required in ("base_model_name_or_path", "revision", "base_hidden_size", "layer", "pooling", "head_type",
                     "output_dim", "normalize", "query_template", "teacher", "library_version"):
        assert required in names
    for f in fields(RetrievalHeadConfig):
        if f.name in names:
            assert f.metadata.get("help"), f"field {f.name} has no help text"


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"pooling": "max_avg"}, "pooling"),
        ({"head_type": "lstm"}, "head_type"),
        ({"query_template": "jinja"}, "query_template"),
        ({"output_dim": 0}, "output_dim"),
        ({"inner_dim": -4}, "inner_dim"),
        ({"max_length": 0}, "max_length"),
        ({"dropout": 1.0}, "dropout"),
        ({"layer": 4, "base_num_layers": 3}, "layer"),
        ({"layer": -5, "base_num_layers": 3}, "layer"),
        ({"output_dim": 16, "teacher": {"id": "t", "dim": 384}}, "output_dim"),
    ],
)
def test_bad_values_raise_naming_the_field(overrides: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=rf"RetrievalHeadConfig\.{field_name}\b"):
        RetrievalHeadConfig(**overrides)


def test_bad_pooling_message_names_value_and_choices() -> None:
    with pytest.raises(ValueError) as info:
        RetrievalHeadConfig(pooling="max_avg")
    assert "'max_avg'" in str(info.value) and "'mean'" in str(info.value) and "'last_token'" in str(info.value)


def test_layer_out_of_range_message_gives_the_valid_range() -> None:
    with pytest.raises(ValueError, match=r"\[-4, 3\]"):
        RetrievalHeadConfig(layer=7, base_num_layers=3)


@pytest.mark.parametrize(("layer", "index"), [(-1, 3), (0, 0), (2, 2), (3, 3), (-4, 0), (-2, 2)])
def test_resolve_layer(layer: int, index: int) -> None:
    assert RetrievalHeadConfig(layer=layer).resolve_layer(3) == index


def test_json_is_sorted_indented_and_complete() -> None:
    config = RetrievalHeadConfig(output_dim=16, pooling="last_token", teacher={"id": "t", "dim": 16})
    text = config.to_json_string()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert text.endswith("\n") and text.startswith("{\n  \"")
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert data["model_type"] == MODEL_TYPE
    assert own_field_names() <= set(data)  # defaults included: the file shows the whole head
    assert data["pooling"] == "last_token" and data["teacher"] == {"id": "t", "dim": 16}
    assert data["library_version"] == retrieval_head.__version__


def test_json_round_trip(tmp_path) -> None:
    config = RetrievalHeadConfig(output_dim=16, layer=-2, prompts={"query": "q: "}, system_prompt="Be brief.")
    path = tmp_path / CONFIG_NAME
    path.write_text(config.to_json_string(), encoding="utf-8")
    again = RetrievalHeadConfig.from_json_file(path)
    assert again.head_fields == config.head_fields
    assert again.to_json_string() == config.to_json_string()


def test_unknown_keys_from_a_newer_version_are_dropped_with_a_warning(tmp_path, caplog) -> None:
    data = json.loads(RetrievalHeadConfig(output_dim=16).to_json_string())
    data.update({"future_option": 3, "library_version": "9.0.0"})
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps(data), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="retrieval_head.core.config"):
        config = RetrievalHeadConfig.from_json_file(path)
    assert config.output_dim == 16
    assert not hasattr(config, "future_option")
    assert "future_option" not in config.to_json_string()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "future_option" in messages and "9.0.0" in messages


def test_transformers_keys_are_not_reported_as_unknown(tmp_path, caplog) -> None:
    data = json.loads(RetrievalHeadConfig().to_json_string())
    data.update({"transformers_version": "5.0.0", "dtype": "float32"})
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps(data), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="retrieval_head.core.config"):
        RetrievalHeadConfig.from_json_file(path)
    assert not caplog.records


def test_from_json_file_names_the_file_when_invalid(tmp_path) -> None:
    path = tmp_path / CONFIG_NAME
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON") as info:
        RetrievalHeadConfig.from_json_file(path)
    assert str(path) in str(info.value)


def test_from_json_file_rejects_another_model_type(tmp_path) -> None:
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32}), encoding="utf-8")
    with pytest.raises(ValueError, match="model_type='llama'") as info:
        RetrievalHeadConfig.from_json_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("key", "value"), [("pooling", "max_avg"), ("layer", 99), ("head_type", "rnn")])
def test_from_json_file_with_a_bad_value_names_file_and_field(tmp_path, key: str, value) -> None:
    data = json.loads(RetrievalHeadConfig(base_num_layers=3).to_json_string())
    data[key] = value
    path = tmp_path / CONFIG_NAME
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"RetrievalHeadConfig\.{key}\b") as info:
        RetrievalHeadConfig.from_json_file(path)
    assert str(path) in str(info.value)


def test_static_span_is_checked() -> None:
    with pytest.raises(ValueError, match="static_span='dialogue'.*'conversation'"):
        RetrievalHeadConfig(static_span="dialogue")
