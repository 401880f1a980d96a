"""Tests for retrieval_head.io.auto: transformers' Auto classes return the wrapper once the package is imported."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from core_helpers import TEXTS, one_thread, small_config
from tiny import save_tiny
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

import retrieval_head
from retrieval_head import RetrievalHeadConfig, RetrievalModel, get_retrieval_model
from retrieval_head.io.auto import register_auto_classes

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture()
def head_folder(tmp_path):
    base_dir = save_tiny(tmp_path / "base", "qwen2")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = get_retrieval_model(base, small_config(pooling="last_token"), tokenizer=tokenizer)
    return model, model.save_pretrained(tmp_path / "head")


def test_registration_is_idempotent() -> None:
    register_auto_classes()
    register_auto_classes()
    assert isinstance(AutoConfig.for_model("retrieval_head"), RetrievalHeadConfig)


def test_auto_config_reads_the_head_config(head_folder, caplog) -> None:
    model, folder = head_folder
    with caplog.at_level(logging.WARNING, logger="retrieval_head.core.config"):
        config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, RetrievalHeadConfig)
    assert config.head_fields == model.config.head_fields
    assert not caplog.records  # nothing transformers adds is taken for an unknown key


def test_auto_model_returns_base_plus_head(head_folder) -> None:
    model, folder = head_folder
    assert retrieval_head.RetrievalModel is RetrievalModel
    loaded = AutoModel.from_pretrained(folder)
    assert isinstance(loaded, RetrievalModel)
    assert type(loaded.base_model).__name__ == "Qwen2ForCausalLM"
    assert np.abs(loaded.encode(TEXTS) - model.encode(TEXTS)).max() < 1e-6


def test_auto_config_saved_by_transformers_round_trips(head_folder, tmp_path) -> None:
    model, folder = head_folder
    config = AutoConfig.from_pretrained(folder)
    config.save_pretrained(tmp_path / "copy")
    again = AutoConfig.from_pretrained(tmp_path / "copy")
    assert isinstance(again, RetrievalHeadConfig) and again.head_fields == model.config.head_fields


def test_auto_config_drops_keys_from_a_newer_version_with_a_warning(head_folder, caplog) -> None:
    _, folder = head_folder
    data = json.loads((folder / "config.json").read_text())
    data["future_option"] = {"x": 1}
    (folder / "config.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="retrieval_head.core.config"):
        config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, RetrievalHeadConfig) and not hasattr(config, "future_option")
    assert "future_option" in caplog.text


def test_what_newer_auto_classes_pass_along_is_taken_and_a_subfolder_is_a_clear_error(head_folder) -> None:
    model, folder = head_folder
    again = RetrievalModel.from_pretrained(folder, proxies=None, subfolder="")
    assert (again.encode(["hi"]) == model.encode(["hi"])).all()
    with pytest.raises(ValueError, match="subfolder='x' is not supported"):
        RetrievalModel.from_pretrained(folder, subfolder="x")
