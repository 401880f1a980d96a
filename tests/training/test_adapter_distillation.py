"""The encode adapter: a LoRA trained with the head, on only while encoding; generation stays the base's."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import save_tiny
from training_helpers import WORDS, FakeTeacher
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrieval_head import RetrievalHeadConfig, RetrievalModel
from retrieval_head.adapters.encode_adapter import (
    ENCODE_ADAPTER_DIR,
    EncodeAdapterError,
    add_encode_adapter,
    encode_adapter_parameters,
)
from retrieval_head.adapters.recorded import fingerprint_adapter
from retrieval_head.agent import NativeRetriever
from retrieval_head.core.config import HeadFolderError
from retrieval_head.training.adapter_distillation import train_encode_adapter
from retrieval_head.training.losses import DistillationLoss

ARCHS = ["llama", "gpt2"]
TEXTS = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(3 + i % 5)) for i in range(24)]


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encode-adapter")
    return {arch: save_tiny(root / arch, arch) for arch in ARCHS}


def load(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def distillation_loss(model: RetrievalModel, texts: list[str], targets: torch.Tensor) -> float:
    """The alignment loss of the model's query embeddings against the teacher's (inference mode)."""
    student = model.encode_query(texts, batch_size=32, convert_to_tensor=True)
    return DistillationLoss({"alignment": 1.0})(student.float(), targets.float())[1]["total"]


def make_model(folder: Path) -> RetrievalModel:
    config = RetrievalHeadConfig(output_dim=16, inner_dim=32, dropout=0.0, layer=-2, query_template="plain", seed=3)
    return RetrievalModel(load(folder), config, tokenizer=AutoTokenizer.from_pretrained(folder))


@pytest.fixture(scope="module")
def trained(base_dirs) -> dict[str, tuple[RetrievalModel, dict, float, float, dict]]:
    """Per architecture: (model after 12 steps, base weights before, loss before, loss after, result record)."""
    teacher = FakeTeacher()
    targets = teacher.encode(TEXTS, convert_to_tensor=True)
    out = {}
    for arch, folder in base_dirs.items():
        model = make_model(folder)
        before_weights = {k: v.clone() for k, v in model.base_model.state_dict().items()}
        before = distillation_loss(model, TEXTS, targets)
        result = train_encode_adapter(model, TEXTS, targets, r=4, alpha=8, lr=5e-3, batch_size=8, max_steps=12,
                                      warmup_ratio=0.0, seed=0)
        out[arch] = (model, before_weights, before, distillation_loss(model, TEXTS, targets), result)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss_and_moves_only_the_lora(trained, arch) -> None:
    model, before_weights, before, after, result = trained[arch]
    assert result.steps == 12 and result.log[-1]["step"] == 12
    assert after < before - 1e-3, (before, after)
    lora = encode_adapter_parameters(model)
    assert lora and any(float(p.abs().max()) > 0 for name, p in model.base_model.named_parameters()
                        if "lora_B" in name)  # B starts at 0: it moved
    now = model.base_model.state_dict()
    base_keys = [k for k in now if "lora_" not in k]
    assert base_keys
    for key in base_keys:  # the base's own weights are untouched (PEFT keeps them under base_layer.)
        original = key.replace(".base_layer.", ".")
        assert torch.equal(now[key], before_weights[original]), key
    assert not any(p.requires_grad for p in model.base_model.parameters())  # frozen again after training
    record = model.config.encode_adapter
    assert record["r"] == 4 and record["alpha"] == 8.0 and record["target_modules"] and record["checksum"]
    assert fingerprint_adapter(model.base_model) is None  # not mistaken for an agent adapter


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_is_the_bases_and_encoding_is_adapted(trained, base_dirs, arch) -> None:
    model = trained[arch][0]
    plain = load(base_dirs[arch])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = plain.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, **kwargs), expected)
    assert torch.equal(model.base_model.generate(ids, **kwargs), expected)  # off by default, not only in generate
    with torch.no_grad():  # the head reads adapted states: they differ from the plain base's
        adapted = model.layer_states(ids, torch.ones_like(ids))
        plain_states = plain(input_ids=ids, output_hidden_states=True).hidden_states[model.layer_index]
    assert (adapted - plain_states).abs().max() > 1e-4
    assert torch.equal(model.generate(ids, **kwargs), expected)  # and encoding left it off


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_gives_identical_embeddings(trained, arch, tmp_path) -> None:
    model = trained[arch][0]
    model.save_pretrained(tmp_path / "head")
    saved = json.loads((tmp_path / "head" / "config.json").read_text())
    assert saved["encode_adapter"] == model.config.encode_adapter
    assert not (tmp_path / "head" / "adapter_config.json").exists()
    assert (tmp_path / "head" / ENCODE_ADAPTER_DIR / "adapter_config.json").is_file()
    again = RetrievalModel.from_pretrained(tmp_path / "head")  # base by its recorded path, adapter from the folder
    expected = model.encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(again.encode(TEXTS, convert_to_tensor=True), expected, atol=1e-6)
    ids = torch.tensor([[5, 6, 7, 8]])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(again.generate(ids, **kwargs), model.generate(ids, **kwargs))
    # PEFT's own loader reads the subfolder: the same adapted states
    peft_model = PeftModel.from_pretrained(load(Path(model.config.base_model_name_or_path)),
                                           str(tmp_path / "head" / ENCODE_ADAPTER_DIR)).eval()
    with torch.no_grad():
        states = peft_model(input_ids=ids, output_hidden_states=True).hidden_states[model.layer_index]
        assert torch.allclose(states, model.layer_states(ids, torch.ones_like(ids)), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sentence_transformers_loader_restores_the_encode_adapter(trained, arch, tmp_path) -> None:
    from retrieval_head import load_sentence_transformer

    model = trained[arch][0]
    model.save_pretrained(tmp_path / "head")
    st = load_sentence_transformer(str(tmp_path / "head"), device="cpu")
    expected = model.encode(TEXTS, convert_to_tensor=True)
    assert torch.allclose(st.encode(TEXTS, convert_to_tensor=True), expected, atol=1e-5)
    config = copy.deepcopy(model.config)
    config.encode_adapter = None  # the same head on the plain base embeds differently
    plain = RetrievalModel(load(Path(config.base_model_name_or_path)), config, tokenizer=model.tokenizer)
    plain.head.load_state_dict(model.head.state_dict())
    assert (plain.encode(TEXTS, convert_to_tensor=True) - expected).abs().max() > 1e-4


def test_missing_or_foreign_subfolder_is_refused(trained, tmp_path) -> None:
    model = trained["llama"][0]
    model.save_pretrained(tmp_path / "head")
    backup = tmp_path / "adapter-backup"
    shutil.move(tmp_path / "head" / ENCODE_ADAPTER_DIR, backup)
    with pytest.raises(HeadFolderError, match="records an encode adapter.*encode_adapter does not exist"):
        RetrievalModel.from_pretrained(tmp_path / "head")
    shutil.copytree(backup, tmp_path / "head" / ENCODE_ADAPTER_DIR)
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    config["encode_adapter"]["checksum"] = "0" * 64
    (tmp_path / "head" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HeadFolderError, match="does not hold the encode adapter"):
        RetrievalModel.from_pretrained(tmp_path / "head")


def test_config_without_the_adapter_on_the_base_is_refused(trained, base_dirs) -> None:
    model = trained["llama"][0]
    config = RetrievalHeadConfig(**copy.deepcopy(model.config.head_fields))
    bare = RetrievalModel(load(base_dirs["llama"]), config, tokenizer=model.tokenizer)
    with pytest.raises(EncodeAdapterError, match="records an encode adapter.*carries none"):
        bare.encode(TEXTS[:2])


def test_agent_refuses_a_model_with_an_encode_adapter(trained) -> None:
    model = trained["llama"][0]
    with pytest.raises(EncodeAdapterError, match="extra LM pass"):
        NativeRetriever(model)


def test_adapted_agent_is_refused(base_dirs) -> None:
    peft_model = get_peft_model(load(base_dirs["llama"]), LoraConfig(r=2, target_modules=["q_proj"]))
    config = RetrievalHeadConfig(output_dim=16, inner_dim=32, layer=-2, query_template="plain")
    model = RetrievalModel(peft_model, config, tokenizer=AutoTokenizer.from_pretrained(base_dirs["llama"]))
    with pytest.raises(EncodeAdapterError, match="merge"):
        add_encode_adapter(model)
