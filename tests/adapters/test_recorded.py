"""Heads on PEFT-adapted agents: adapted hidden states, adapter recorded and rebuilt, merged == unmerged, refusals."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrieval_head import BaseMismatchError, RetrievalHeadConfig, RetrievalModel
from retrieval_head.adapters.recorded import (
    AdapterMismatchError,
    adapter_checksum,
    fingerprint_adapter,
    load_adapter,
    merge_adapter,
)
from retrieval_head.io.folder import WEIGHTS_NAME

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
ARCHS = sorted(TARGETS)
TEXTS = ["where can I park my car near the hotel", "is breakfast included", "what is the capital of France"]


def head_config(**kwargs) -> RetrievalHeadConfig:
    defaults = dict(output_dim=16, inner_dim=32, dropout=0.0, layer=-2, query_template="plain", seed=3)
    return RetrievalHeadConfig(**{**defaults, **kwargs})


def base(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def fresh_lora(folder: Path, arch: str, seed: int) -> PeftModel:
    """A LoRA with random (non-zero) A and B, so the adapted model really differs from the base."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False,
                        fan_in_fan_out=arch == "gpt2")
    return get_peft_model(base(folder), config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per architecture: a tiny base folder and two different LoRA adapter folders (ids are paths)."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for arch in ARCHS:
        base_dir = save_tiny(root / f"{arch}-base", arch)
        dirs = {"base": base_dir}
        for name, seed in (("a", 1), ("b", 2)):
            fresh_lora(base_dir, arch, seed).save_pretrained(root / f"{arch}-lora-{name}")
            dirs[name] = root / f"{arch}-lora-{name}"
        out[arch] = dirs
    return out


def tokenizer(folder: Path):
    return AutoTokenizer.from_pretrained(folder)


def embeddings(model: RetrievalModel) -> torch.Tensor:
    return model.encode(TEXTS, convert_to_tensor=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_come_from_the_adapted_model(saved, arch) -> None:
    dirs = saved[arch]
    peft_model = load_adapter(base(dirs["base"]), str(dirs["a"]))
    model = RetrievalModel(peft_model, head_config(), tokenizer=tokenizer(dirs["base"]))
    assert model.config.base_num_layers == 3 and model.layer_index == 2
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    adapted = peft_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(adapted) == 4  # embeddings + 3 blocks, through the PeftModel
    with peft_model.disable_adapter():
        bare = peft_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    states = model.layer_states(ids, mask)
    torch.testing.assert_close(states, adapted[2])
    assert (states - bare[2]).abs().max() > 1e-3  # the LoRA changes the layer the head reads


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_rebuilds_base_adapter_and_head(saved, arch, tmp_path) -> None:
    dirs = saved[arch]
    model = RetrievalModel(load_adapter(base(dirs["base"]), str(dirs["a"])), head_config(),
                           tokenizer=tokenizer(dirs["base"]))
    assert model.config.base_model_name_or_path == str(dirs["base"])
    assert model.config.adapter_name_or_path == str(dirs["a"])
    assert model.config.adapter_revision is None
    assert len(model.config.adapter_checksum) == 64
    torch.nn.init.normal_(model.head.project[0].weight)  # "trained" head weights
    expected = embeddings(model)
    model.save_pretrained(tmp_path / "head")
    assert {"config.json", WEIGHTS_NAME} <= {p.name for p in (tmp_path / "head").iterdir()}
    assert not list(tmp_path.rglob("adapter_config.json"))  # a head folder never looks like a PEFT adapter

    loaded = RetrievalModel.from_pretrained(tmp_path / "head")
    assert isinstance(loaded.base_model, PeftModel)
    assert loaded.config.adapter_checksum == model.config.adapter_checksum
    assert loaded.config.adapter_name_or_path == str(dirs["a"])
    torch.testing.assert_close(embeddings(loaded), expected)

    # the same adapter under another name (a copied folder) has the same checksum and is accepted
    shutil.copytree(dirs["a"], tmp_path / "copy")
    copy = load_adapter(base(dirs["base"]), str(tmp_path / "copy"))
    again = RetrievalModel.from_pretrained(tmp_path / "head", base_model=copy, tokenizer=tokenizer(dirs["base"]))
    torch.testing.assert_close(embeddings(again), expected)


def test_checksum_is_the_adapters_not_the_loaders(saved) -> None:
    dirs = saved["llama"]
    made = fresh_lora(dirs["base"], "llama", seed=1)  # the very adapter saved as "a"
    via_peft = PeftModel.from_pretrained(base(dirs["base"]), str(dirs["a"]))
    via_transformers = AutoModelForCausalLM.from_pretrained(dirs["a"])  # transformers' PEFT integration
    sums = {adapter_checksum(made), adapter_checksum(via_peft), fingerprint_adapter(via_transformers).checksum}
    assert len(sums) == 1
    other = PeftModel.from_pretrained(base(dirs["base"]), str(dirs["b"]))
    assert adapter_checksum(other) not in sums
    assert fingerprint_adapter(base(dirs["base"])) is None


def test_unsaved_adapter_warns_and_records_no_id(saved, tmp_path, caplog) -> None:
    dirs = saved["llama"]
    peft_model = fresh_lora(dirs["base"], "llama", seed=1)
    with caplog.at_level(logging.WARNING, logger="retrieval_head.adapters.recorded"):
        model = RetrievalModel(peft_model, head_config(), tokenizer=tokenizer(dirs["base"]))
    assert "save the adapter" in caplog.text.lower()
    assert model.config.adapter_name_or_path is None and model.config.adapter_checksum
    model.save_pretrained(tmp_path / "head")
    with pytest.raises(AdapterMismatchError, match="never saved"):
        RetrievalModel.from_pretrained(tmp_path / "head")
    # reload by passing the adapted model; then name the saved adapter and the head rebuilds it alone
    again = RetrievalModel.from_pretrained(tmp_path / "head", base_model=peft_model, tokenizer=tokenizer(dirs["base"]))
    peft_model.save_pretrained(tmp_path / "lora")
    again.config.adapter_name_or_path = str(tmp_path / "lora")
    again.save_pretrained(tmp_path / "head")
    rebuilt = RetrievalModel.from_pretrained(tmp_path / "head")
    torch.testing.assert_close(embeddings(rebuilt), embeddings(again))


def test_adapter_named_by_the_user_is_kept(saved, caplog) -> None:
    dirs = saved["llama"]
    with caplog.at_level(logging.WARNING, logger="retrieval_head.adapters.recorded"):
        model = RetrievalModel(fresh_lora(dirs["base"], "llama", seed=1),
                               head_config(adapter_name_or_path="me/lora", adapter_revision="v1"))
    assert not caplog.records
    assert (model.config.adapter_name_or_path, model.config.adapter_revision) == ("me/lora", "v1")
    with pytest.raises(AdapterMismatchError, match="allow_merged=True"):
        RetrievalModel(base(dirs["base"]), head_config(adapter_name_or_path="me/lora"))


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_adapter_gives_the_same_embeddings(saved, arch) -> None:
    dirs = saved[arch]
    model = RetrievalModel(load_adapter(base(dirs["base"]), str(dirs["a"])), head_config(),
                           tokenizer=tokenizer(dirs["base"]))
    torch.nn.init.normal_(model.head.project[0].weight)
    unmerged = embeddings(model)
    state = model.head.state_dict()

    merged = merge_adapter(model.base_model)  # remembers which adapter it merged: accepted as is
    assert not isinstance(merged, PeftModel)
    on_merged = RetrievalModel(merged, model.config, tokenizer=tokenizer(dirs["base"]))
    on_merged.head.load_state_dict(state)
    assert (embeddings(on_merged) - unmerged).abs().max().item() < 1e-4

    # merged by peft directly (no note): refused unless the user says it is merged
    plain = load_adapter(base(dirs["base"]), str(dirs["a"])).merge_and_unload()
    with pytest.raises(AdapterMismatchError, match="allow_merged=True"):
        RetrievalModel(plain, model.config)
    accepted = RetrievalModel(plain, model.config, tokenizer=tokenizer(dirs["base"]), allow_merged=True)
    accepted.head.load_state_dict(state)
    assert (embeddings(accepted) - unmerged).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_head_on_another_adapter_or_bare_base_is_refused(saved, arch, tmp_path) -> None:
    dirs = saved[arch]
    tok = tokenizer(dirs["base"])
    RetrievalModel(load_adapter(base(dirs["base"]), str(dirs["a"])), head_config(), tok).save_pretrained(
        tmp_path / "on-a"
    )
    other = load_adapter(base(dirs["base"]), str(dirs["b"]))
    with pytest.raises(AdapterMismatchError) as err:
        RetrievalModel.from_pretrained(tmp_path / "on-a", base_model=other, tokenizer=tok)
    assert str(dirs["a"]) in str(err.value) and str(dirs["b"]) in str(err.value)

    with pytest.raises(AdapterMismatchError, match="no adapter") as err:
        RetrievalModel.from_pretrained(tmp_path / "on-a", base_model=base(dirs["base"]), tokenizer=tok)
    assert str(dirs["a"]) in str(err.value) and str(dirs["base"]) in str(err.value)
    assert isinstance(err.value, BaseMismatchError)

    # a head trained on the bare base is refused on an adapter
    RetrievalModel(base(dirs["base"]), head_config(), tok).save_pretrained(tmp_path / "bare")
    with pytest.raises(AdapterMismatchError, match="bare base") as err:
        RetrievalModel.from_pretrained(tmp_path / "bare", base_model=other, tokenizer=tok)
    assert str(dirs["b"]) in str(err.value)
    # ... and another merged adapter is not the recorded one, even when merged by merge_adapter
    with pytest.raises(AdapterMismatchError, match="merged in"):
        RetrievalModel.from_pretrained(tmp_path / "on-a", base_model=merge_adapter(other), tokenizer=tok)


def test_switching_the_active_adapter_is_checked(saved, tmp_path) -> None:
    dirs = saved["llama"]
    peft_model = load_adapter(base(dirs["base"]), str(dirs["a"]))
    model = RetrievalModel(peft_model, head_config(), tokenizer(dirs["base"]))
    model.save_pretrained(tmp_path / "head")
    peft_model.load_adapter(str(dirs["b"]), adapter_name="b")
    peft_model.set_adapter("b")
    with pytest.raises(AdapterMismatchError, match="sha256"):
        RetrievalModel.from_pretrained(tmp_path / "head", base_model=peft_model)
    peft_model.set_adapter("default")
    RetrievalModel.from_pretrained(tmp_path / "head", base_model=peft_model)
