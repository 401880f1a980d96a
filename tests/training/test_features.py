"""Tests for training.features: truncated LM pass, sharded content-keyed cache, resume, damaged shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from core_helpers import make_model

from retrieval_head.io.tensor_cache import TensorCache
from retrieval_head.training import features
from retrieval_head.training.features import cached_features, extract_features

TEXTS = [f"where can I park my car near hotel number {i}" for i in range(7)] + [
    [{"role": "user", "content": "is breakfast included"}, {"role": "assistant", "content": "yes"},
     {"role": "user", "content": "and parking?"}],
]


def full_pass_mean(model, item) -> torch.Tensor:
    """The head's layer by a full forward (logits and every layer), standardised and mean-pooled over the span."""
    batch = model.renderer.collate([model.renderer.render(item)])
    with torch.inference_mode():
        states = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  output_hidden_states=True).hidden_states[2]
    states = torch.nn.functional.layer_norm(states, states.shape[-1:])
    mask = batch["span_mask"][0].bool()
    return states[0][mask].mean(0)


def test_features_equal_a_full_pass_and_carry_the_span_ids() -> None:
    model = make_model()
    out = extract_features(model, TEXTS, [0, 2], batch_size=3, show_progress_bar=False)
    for i, item in enumerate(TEXTS):
        assert torch.allclose(out["mean.L2"][i].float(), full_pass_mean(model, item), atol=2e-3)
        rendered = model.renderer.render(item)
        ids = out["span_ids"][out["span_offsets"][i] : out["span_offsets"][i + 1]].tolist()
        assert ids == rendered.input_ids[rendered.span_start : rendered.span_end]
    assert out["mean.L0"].shape == out["mean.L2"].shape


def test_sharded_cache_equals_one_extraction_and_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    whole = extract_features(model, TEXTS, [2], token_layer=2, show_progress_bar=False)
    cache = TensorCache(tmp_path)
    built = cached_features(model, TEXTS, cache, [2], token_layer=2, shard_size=3, show_progress_bar=False)
    assert sorted(built) == sorted(whole)
    for name in whole:
        assert torch.allclose(built[name].float(), whole[name].float(), atol=2e-3), name
    shards = sorted((next(tmp_path.iterdir())).glob("shard-*.safetensors"))
    assert len(shards) == 3
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: pytest.fail("recomputed a finished shard"))
    again = cached_features(model, TEXTS, cache, [2], token_layer=2, shard_size=3, show_progress_bar=False)
    assert torch.equal(again["tokens.L2"], built["tokens.L2"])
    prefix = cached_features(model, TEXTS[:6], cache, [2], token_layer=2, shard_size=3, show_progress_bar=False)
    assert torch.equal(prefix["mean.L2"], built["mean.L2"][:6])  # a shorter list made of the same shards


def test_a_killed_build_resumes_and_a_damaged_shard_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    real, calls = features.extract_features, []

    def dies_on_the_second_shard(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "extract_features", dies_on_the_second_shard)
    cache = TensorCache(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cached_features(model, TEXTS, cache, [2], shard_size=3, show_progress_bar=False)
    folder = next(tmp_path.iterdir())
    assert len(list(folder.glob("shard-*.safetensors"))) == 1 and not list(folder.glob(".shard-*"))
    calls.clear()
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k))[1])
    out = cached_features(model, TEXTS, cache, [2], shard_size=3, show_progress_bar=False)
    assert calls == [3, 2] and out["mean.L2"].shape[0] == len(TEXTS)
    damaged = sorted(folder.glob("shard-*.safetensors"))[0]
    damaged.write_bytes(b"not safetensors")
    calls.clear()
    again = cached_features(model, TEXTS, cache, [2], shard_size=3, show_progress_bar=False)
    assert len(calls) == 1 and torch.equal(again["mean.L2"], out["mean.L2"])


def test_another_layer_set_or_base_is_never_reused(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path)
    cached_features(make_model(), TEXTS, cache, [2], show_progress_bar=False)
    cached_features(make_model(), TEXTS, cache, [1, 2], show_progress_bar=False)
    other = make_model()
    other.config.base_model_name_or_path = "someone/another-base"
    cached_features(other, TEXTS, cache, [2], show_progress_bar=False)
    assert len(list(tmp_path.iterdir())) == 3
    in_bf16 = make_model()
    in_bf16.base_model.to(torch.bfloat16)  # `base.dtype: bfloat16` (or `auto` on a CPU with native bf16)
    cached_features(in_bf16, TEXTS, cache, [2], show_progress_bar=False)
    assert len(list(tmp_path.iterdir())) == 4


def test_bfloat16_autocast_is_close_and_an_unknown_precision_is_refused() -> None:
    model = make_model()
    fp32 = extract_features(model, TEXTS[:3], [2], show_progress_bar=False)["mean.L2"].float()
    bf16 = extract_features(model, TEXTS[:3], [2], show_progress_bar=False, autocast="bfloat16")["mean.L2"].float()
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.95
    with pytest.raises(ValueError, match="autocast"):
        extract_features(model, TEXTS[:3], [2], show_progress_bar=False, autocast="int4")


def test_a_conversation_wide_static_branch_trains_on_the_dialogues_ids_and_keeps_the_cache(tmp_path: Path) -> None:
    from retrieval_head.training.features import with_static_ids

    narrow = make_model(static_dim=4)
    wide = make_model(static_dim=4, static_span="conversation")
    cached = cached_features(narrow, TEXTS, TensorCache(tmp_path), layers=[2], show_progress_bar=False)
    again = cached_features(wide, TEXTS, TensorCache(tmp_path), layers=[2], show_progress_bar=False)
    assert torch.equal(again["mean.L2"], cached["mean.L2"])  # the LM features do not depend on the branch's span
    assert with_static_ids(narrow, TEXTS, cached) is cached
    out = with_static_ids(wide, TEXTS, cached)
    offsets = out["span_offsets"]
    rows = [out["span_ids"][offsets[i] : offsets[i + 1]].tolist() for i in range(len(TEXTS))]
    for i, item in enumerate(TEXTS):
        rendered = wide.renderer.render(item)
        assert rows[i] == rendered.static_ids()
        if isinstance(item, str):
            assert rows[i] == cached["span_ids"][cached["span_offsets"][i] : cached["span_offsets"][i + 1]].tolist()
    assert len(rows[-1]) > cached["span_offsets"][-1] - cached["span_offsets"][-2]  # the history's ids too
