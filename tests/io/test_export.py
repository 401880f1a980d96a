"""Tests for retrieval_head.io.export: a standalone sentence-transformers folder from built-in modules only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sentence_transformers import SentenceTransformer
from tiny import tiny_causal_lm, tiny_tokenizer

from retrieval_head import RetrievalHeadConfig, RetrievalModel, get_retrieval_model
from retrieval_head.cli import main
from retrieval_head.io import export
from retrieval_head.io.export import ExportError, export_sentence_transformer

TEXTS = ["where can I park my car near the hotel", "is breakfast included", "what is the capital of France",
         "the restaurant serves vegetarian food and has outdoor seating and do they allow pets"]
TEACHER = {"teacher_id": "t", "revision": None, "dim": 16, "similarity_fn_name": "cosine", "normalized": True,
           "probe_checksum": "c"}


def tiny_model(arch: str = "llama", **overrides) -> RetrievalModel:
    """A tiny random base with states of a real LM's scale (the head's LayerNorm epsilon then does not show)."""
    base = tiny_causal_lm(arch)
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(50)
    settings = dict(output_dim=16, inner_dim=32, head_type="mlp", layer=2, teacher=TEACHER)
    settings.update(overrides)
    model = get_retrieval_model(base, RetrievalHeadConfig(**settings), tokenizer=tiny_tokenizer(chat=arch != "gpt2"))
    if model.head._dense:
        torch.nn.init.normal_(model.head._dense[0].weight, generator=torch.Generator().manual_seed(1))
    return model


def assert_same_vectors(model: RetrievalModel, folder: Path, texts: list[str] = TEXTS) -> None:
    loaded = SentenceTransformer(str(folder), device="cpu")  # no trust_remote_code
    expected = model.encode(texts, convert_to_tensor=True)
    scale = max(1.0, float(expected.norm(dim=-1).max()))
    for got in (loaded.encode(texts, convert_to_tensor=True), loaded.encode_query(texts, convert_to_tensor=True)):
        assert (got - expected).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "gpt2"])
def test_the_exported_folder_gives_the_heads_vectors_with_built_in_modules_only(arch: str, tmp_path: Path) -> None:
    model = tiny_model(arch)
    result = export_sentence_transformer(model, tmp_path / "out")
    folder = Path(result["path"])
    assert_same_vectors(model, folder)
    types = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    assert all(t.startswith("sentence_transformers.") for t in types)
    assert "retrieval_head" not in "".join(p.read_text(errors="ignore") for p in folder.rglob("*.json"))
    config = json.loads((folder / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layer")) == 2  # blocks past the head's layer are gone
    card = (folder / "README.md").read_text()
    assert card.startswith("---") and "standalone sentence-transformers form" in card and "`t`" in card


@pytest.mark.parametrize("overrides", [{"layer": -1}, {"head_type": "linear"}, {"normalize": False}])
def test_other_heads_export_alike(overrides: dict, tmp_path: Path) -> None:
    model = tiny_model(**overrides)
    assert_same_vectors(model, Path(export_sentence_transformer(model, tmp_path / "out")["path"]))


@pytest.mark.parametrize(("overrides", "named"), [
    ({"static_dim": 4}, "static branch"), ({"head_type": "transformer"}, "token-level"),
    ({"pooling": "last_token"}, "pooling"), ({"prompts": {"query": "query: ", "document": ""}}, "prompts"),
])
def test_heads_the_built_in_modules_cannot_express_are_refused_with_the_fallback(
    overrides: dict, named: str, tmp_path: Path,
) -> None:
    model = tiny_model(**overrides)
    with pytest.raises(ExportError, match=named) as err:
        export_sentence_transformer(model, tmp_path / "out")
    assert "trust_remote_code=True" in str(err.value) and "load_sentence_transformer" in str(err.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_folder_in_the_way_is_kept_unless_overwritten_and_a_failed_check_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_model()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_sentence_transformer(model, out)
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # no folder can pass: the check must refuse it
    with pytest.raises(ExportError, match="max abs diff"):
        export_sentence_transformer(model, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and len(list(tmp_path.iterdir())) == 1
    monkeypatch.undo()
    export_sentence_transformer(model, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert_same_vectors(model, out)


def test_the_command_exports_a_saved_head_and_refuses_one_it_cannot(tmp_path: Path, capsys) -> None:
    from tiny import save_tiny

    from retrieval_head.io.embedded import load_base

    base, tokenizer = load_base(str(save_tiny(tmp_path / "base")))
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(50)
    base.save_pretrained(tmp_path / "base")
    base, tokenizer = load_base(str(tmp_path / "base"))
    for name, extra in (("plain", {}), ("static", {"static_dim": 4})):
        config = RetrievalHeadConfig(output_dim=16, inner_dim=32, layer=2, teacher=TEACHER, **extra)
        get_retrieval_model(base, config, tokenizer=tokenizer).save_pretrained(tmp_path / name)
    assert main(["export", str(tmp_path / "plain"), str(tmp_path / "out")]) == 0
    assert "max abs diff" in capsys.readouterr().out
    assert_same_vectors(RetrievalModel.from_pretrained(tmp_path / "plain"), tmp_path / "out")
    assert main(["export", str(tmp_path / "static"), str(tmp_path / "out2")]) == 2
    assert "static branch" in capsys.readouterr().err and not (tmp_path / "out2").exists()
