"""Tests for persistence/saving/loading: head weights only, atomic saves, clear errors on damaged folders."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from core_helpers import TEXTS, make_model, one_thread, small_config, tokenizer
from safetensors import safe_open
from tiny import save_tiny, tiny_causal_lm

import retrieval_head.io.folder as persistence
from retrieval_head import BaseMismatchError, HeadFolderError, RetrievalModel, get_retrieval_model
from retrieval_head.core.config import CONFIG_NAME
from retrieval_head.io.folder import WEIGHTS_NAME, read_config, read_weights, write_folder_atomically

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

HEAD_ONLY_KEYS = ("pooling", "head_type", "layer", "base_hidden_size", "base_architecture", "inner_dim")


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def saved(tmp_path: Path, arch: str = "llama", **overrides) -> tuple[RetrievalModel, Path]:
    """A head on a tiny base saved to disk under `tmp_path / 'base'`, and its saved folder."""
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        save_tiny(base_dir, arch)
    from retrieval_head.io.embedded import load_base

    base, tok = load_base(str(base_dir))
    model = get_retrieval_model(base, small_config(**overrides), tokenizer=tok)
    folder = model.save_pretrained(tmp_path / "head")
    return model, folder


def test_folder_holds_head_weights_only(tmp_path) -> None:
    model, folder = saved(tmp_path, head_type="transformer")
    names = {p.name for p in folder.iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "pytorch_model.bin"}
    state = model.head.state_dict()
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == set(state)
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            assert torch.equal(f.get_tensor(key), state[key])
    head_bytes = sum(t.numel() * t.element_size() for t in state.values())
    base_bytes = sum(p.numel() * p.element_size() for p in model.base_model.parameters())
    assert (folder / WEIGHTS_NAME).stat().st_size < head_bytes + 16_384
    assert persistence.folder_size(folder) < base_bytes / 2  # the base is referenced, never copied


def test_config_json_is_the_one_file_of_truth(tmp_path) -> None:
    model, folder = saved(tmp_path)
    text = (folder / CONFIG_NAME).read_text(encoding="utf-8")
    assert text == model.config.to_json_string()
    data = json.loads(text)
    assert data["base_model_name_or_path"] == str(tmp_path / "base")
    assert data["base_architecture"] == "LlamaForCausalLM" and data["base_hidden_size"] == 32
    assert "revision" in data and "library_version" in data
    for other in folder.glob("*.json"):
        if other.name != CONFIG_NAME:
            flat = json.dumps(json.loads(other.read_text(encoding="utf-8")))
            assert not any(f'"{key}"' in flat for key in HEAD_ONLY_KEYS), f"{other.name} repeats head settings"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_pretrained_loads_the_base_named_in_the_config(tmp_path, arch: str) -> None:
    model, folder = saved(tmp_path, arch, head_type="transformer", pooling="last_token")
    again = RetrievalModel.from_pretrained(folder)
    assert type(again.base_model).__name__ == type(model.base_model).__name__
    assert again.config.head_fields == model.config.head_fields
    assert np.abs(again.encode(TEXTS) - model.encode(TEXTS)).max() < 1e-6
    for key, value in model.head.state_dict().items():
        assert torch.equal(again.head.state_dict()[key], value)


def test_from_pretrained_with_a_given_base(tmp_path) -> None:
    model, folder = saved(tmp_path)
    again = RetrievalModel.from_pretrained(folder, base_model=tiny_causal_lm("llama"), tokenizer=tokenizer())
    assert np.abs(again.encode(TEXTS) - model.encode(TEXTS)).max() < 1e-6


def test_from_pretrained_in_bf16_keeps_an_fp32_head(tmp_path) -> None:
    _, folder = saved(tmp_path)
    again = RetrievalModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in again.base_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in again.head.parameters()} == {torch.float32}
    assert np.isfinite(again.encode(TEXTS)).all()


def test_from_pretrained_rejects_another_base_before_any_vector(tmp_path) -> None:
    _, folder = saved(tmp_path)
    other = tiny_causal_lm("qwen2")
    calls = []
    other.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(BaseMismatchError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        RetrievalModel.from_pretrained(folder, base_model=other, tokenizer=tokenizer())
    assert not calls


def test_from_pretrained_unknown_kwargs(tmp_path) -> None:
    _, folder = saved(tmp_path)
    with pytest.raises(TypeError, match="colour"):
        RetrievalModel.from_pretrained(folder, colour="blue")


def test_save_again_overwrites_and_keeps_other_files(tmp_path) -> None:
    model, folder = saved(tmp_path)
    (folder / "notes.txt").write_text("mine", encoding="utf-8")
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(1.0)
    model.save_pretrained(folder)
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "mine"
    weights = read_weights(folder)
    assert all(torch.equal(weights[k], v) for k, v in model.head.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "head"]  # no staging or backup left


def partial_save_file(monkeypatch) -> None:
    """Make the safetensors writer crash after writing half of the file (a full disk, a kill)."""
    real = persistence.save_file

    def crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(persistence, "save_file", crash)


def test_interrupted_save_leaves_the_earlier_save_loadable_and_identical(tmp_path, monkeypatch) -> None:
    model, folder = saved(tmp_path)
    before = folder_bytes(folder)
    vectors = model.encode(TEXTS)
    with torch.no_grad():
        for p in model.head.parameters():
            p.mul_(-2.0)
    partial_save_file(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(folder)
    monkeypatch.undo()
    assert folder_bytes(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "head"]
    again = RetrievalModel.from_pretrained(folder)
    assert np.abs(again.encode(TEXTS) - vectors).max() < 1e-6


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch) -> None:
    model = make_model()
    partial_save_file(monkeypatch)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "head")
    assert list(tmp_path.iterdir()) == []


def test_write_folder_atomically_on_any_exception(tmp_path) -> None:
    target = tmp_path / "out"
    write_folder_atomically(target, lambda f: (f / "a.txt").write_text("1"))

    def failing(f: Path) -> None:
        (f / "a.txt").write_text("2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomically(target, failing)
    assert (target / "a.txt").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_folder_without_config(tmp_path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(HeadFolderError, match=rf"No {CONFIG_NAME} in .*x\.txt"):
        RetrievalModel.from_pretrained(tmp_path)


def test_peft_adapter_folder_is_recognised(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(HeadFolderError, match="PEFT adapter"):
        read_config(tmp_path)


def test_a_plain_model_folder_is_not_a_head(tmp_path) -> None:
    save_tiny(tmp_path / "base", "llama")
    with pytest.raises(ValueError, match=r"model_type='llama'.*no retrieval head") as info:
        RetrievalModel.from_pretrained(tmp_path / "base")
    assert "config.json" in str(info.value)


def test_a_file_is_not_a_folder(tmp_path) -> None:
    path = tmp_path / "head.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(HeadFolderError, match="is a file"):
        RetrievalModel.from_pretrained(path)


def test_missing_weights(tmp_path) -> None:
    _, folder = saved(tmp_path)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(HeadFolderError, match=rf"No {WEIGHTS_NAME}"):
        RetrievalModel.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["truncate", "header", "tiny", "empty"])
def test_truncated_or_corrupted_safetensors_names_the_file(tmp_path, damage: str) -> None:
    _, folder = saved(tmp_path)
    path = folder / WEIGHTS_NAME
    data = path.read_bytes()
    damaged = {
        "truncate": data[: len(data) // 2],
        "header": data[:8] + b"#" * 16 + data[24:],
        "tiny": data[:4],
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(HeadFolderError, match="truncated or corrupted") as info:
        RetrievalModel.from_pretrained(folder)
    assert str(path) in str(info.value)


def test_weights_that_do_not_fit_the_config(tmp_path) -> None:
    _, folder = saved(tmp_path)
    data = json.loads((folder / CONFIG_NAME).read_text())
    data["head_type"] = "linear"
    (folder / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(HeadFolderError, match="do not fit its config"):
        RetrievalModel.from_pretrained(folder)


@pytest.mark.parametrize(("key", "value"), [("pooling", "max_avg"), ("layer", 40), ("output_dim", 0)])
def test_config_with_a_bad_value_names_file_and_field(tmp_path, key: str, value) -> None:
    _, folder = saved(tmp_path)
    data = json.loads((folder / CONFIG_NAME).read_text())
    data[key] = value
    (folder / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"RetrievalHeadConfig\.{key}\b") as info:
        RetrievalModel.from_pretrained(folder)
    assert str(folder / CONFIG_NAME) in str(info.value)


def test_config_that_is_not_json(tmp_path) -> None:
    _, folder = saved(tmp_path)
    (folder / CONFIG_NAME).write_text('{"model_type": "retrieval_head", ')
    with pytest.raises(ValueError, match="not valid JSON") as info:
        RetrievalModel.from_pretrained(folder)
    assert str(folder / CONFIG_NAME) in str(info.value)


def test_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    model, folder = saved(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle load happened")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    again = RetrievalModel.from_pretrained(folder)
    assert np.abs(again.encode(TEXTS[:2]) - model.encode(TEXTS[:2])).max() < 1e-6


def test_save_pretrained_unknown_kwargs(tmp_path) -> None:
    with pytest.raises(TypeError, match="colour"):
        make_model().save_pretrained(tmp_path / "head", colour="blue")
    assert not (tmp_path / "head").exists()


def test_from_pretrained_on_a_device(tmp_path) -> None:
    model, folder = saved(tmp_path)
    again = RetrievalModel.from_pretrained(folder, device="cpu")
    assert again.device.type == "cpu" and again.head_device.type == "cpu"
    assert np.abs(again.encode(TEXTS[:2]) - model.encode(TEXTS[:2])).max() < 1e-6


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_a_quantized_head_saves_its_fp32_weights_and_loads_quantized(tmp_path, dtype: str) -> None:
    model, folder = saved(tmp_path)
    written = read_weights(folder)
    exact = model.encode(TEXTS)
    model.quantize_head(dtype)
    quantized = model.encode(TEXTS)
    assert not np.array_equal(quantized, exact)
    assert np.abs(quantized - exact).max() < 2e-2
    again = model.save_pretrained(tmp_path / "again")
    rewritten = read_weights(again)  # the fp32 weights, not the packed ones
    assert rewritten.keys() == written.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, written[k]) for k, v in rewritten.items())
    loaded = RetrievalModel.from_pretrained(folder, quantize_head_to=dtype)
    assert loaded.head.quantized_to == dtype
    np.testing.assert_array_equal(loaded.encode(TEXTS), quantized)
    assert RetrievalModel.from_pretrained(folder).head.quantized_to is None


def test_the_configs_quantize_to_is_applied_on_load_and_an_explicit_choice_wins(tmp_path) -> None:
    model, folder = saved(tmp_path, quantize_to="float16")
    exact = model.encode(TEXTS)  # the model that trained/saved it runs fp32
    loaded = RetrievalModel.from_pretrained(folder)
    assert model.head.quantized_to is None and loaded.head.quantized_to == "float16"
    quantized = loaded.encode(TEXTS)
    assert not np.array_equal(quantized, exact) and np.abs(quantized - exact).max() < 2e-3
    assert RetrievalModel.from_pretrained(folder, quantize_head_to=None).head.quantized_to is None
    assert RetrievalModel.from_pretrained(folder, quantize_head_to="int8").head.quantized_to == "int8"
    assert read_config(loaded.save_pretrained(tmp_path / "again")).quantize_to == "float16"
    with pytest.raises(ValueError, match="quantize_to='bf16'"):
        small_config(quantize_to="bf16")


def test_from_pretrained_checks_quantize_head_to_before_loading(tmp_path) -> None:
    from retrieval_head import HeadQuantizationError

    with pytest.raises(HeadQuantizationError, match="quantize_to='bf16'"):
        RetrievalModel.from_pretrained(tmp_path / "no-such-head", quantize_head_to="bf16")


def test_a_table_exact_in_float16_is_stored_in_half_the_bytes_and_loads_back_bit_identical(tmp_path) -> None:
    model = make_model(static_dim=2048)  # 300 x 2048 rows: a table large enough to compact
    with torch.no_grad():
        model.head.static.weight.normal_(0, 0.1)
        model.head.static_out.weight.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "fp32")
    with safe_open(str(tmp_path / "fp32" / WEIGHTS_NAME), "pt") as f:
        assert f.get_slice("static.weight").get_dtype() == "F32"  # not exact in fp16: kept as it is
    with torch.no_grad():
        model.head.static.weight.copy_(model.head.static.weight.half().float())
    model.save_pretrained(tmp_path / "fp16")
    with safe_open(str(tmp_path / "fp16" / WEIGHTS_NAME), "pt") as f:
        assert f.get_slice("static.weight").get_dtype() == "F16"
        assert f.get_slice("static_out.weight").get_dtype() == "F32"
    size = (tmp_path / "fp16" / WEIGHTS_NAME).stat().st_size
    assert size < 0.6 * (tmp_path / "fp32" / WEIGHTS_NAME).stat().st_size
    loaded = RetrievalModel.from_pretrained(tmp_path / "fp16", base_model=model.base_model, tokenizer=model.tokenizer)
    assert loaded.head.static.weight.dtype == torch.float32
    assert torch.equal(loaded.head.static.weight, model.head.static.weight)
    np.testing.assert_array_equal(loaded.encode(TEXTS), model.encode(TEXTS))


def test_weights_of_the_wrong_shape_name_the_tensor(tmp_path) -> None:
    _, folder = saved(tmp_path)
    data = json.loads((folder / CONFIG_NAME).read_text())
    data["inner_dim"] = data["inner_dim"] * 2
    (folder / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(HeadFolderError, match=r"wrong shape \(project\.0\.weight is"):
        RetrievalModel.from_pretrained(folder)


def test_weights_holding_nan_are_refused_at_load_with_the_tensors_name(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    _, folder = saved(tmp_path)
    weights = load_file(str(folder / WEIGHTS_NAME))
    name = sorted(weights)[0]
    weights[name][0] = float("nan")
    save_file(weights, str(folder / WEIGHTS_NAME))
    with pytest.raises(HeadFolderError, match=f"NaN or inf \\({name}\\)"):
        RetrievalModel.from_pretrained(folder)


def test_a_config_holding_a_json_list_is_a_clear_error(tmp_path) -> None:
    _, folder = saved(tmp_path)
    (folder / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list, not a head config"):
        RetrievalModel.from_pretrained(folder)


def test_a_path_that_is_neither_a_folder_nor_a_hub_id_says_so(tmp_path) -> None:
    missing = tmp_path / "no" / "such" / "head"
    with pytest.raises(HeadFolderError, match="no such folder, and not a Hub repo id"):
        RetrievalModel.from_pretrained(missing)


def test_the_command_line_precision_choices_map_to_quantize_head_to() -> None:
    from retrieval_head.io.load import FROM_CONFIG, quantize_option

    assert [quantize_option(c) for c in (None, "float32", "float16", "int8")] == [FROM_CONFIG, None, "float16", "int8"]
