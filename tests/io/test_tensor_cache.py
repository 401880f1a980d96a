"""Tests for retrieval_head.io.tensor_cache: content-keyed tensors computed once, damaged entries recomputed, layers."""

from __future__ import annotations

from pathlib import Path

import torch

from retrieval_head.io.tensor_cache import LayeredCache, TensorCache, cache_key


def counting(value: float):
    calls = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"x": torch.full((2, 3), value)}

    return compute, calls


def test_key_depends_on_every_part() -> None:
    assert cache_key(a=1, b="t") == cache_key(b="t", a=1)
    assert cache_key(a=1, b="t") != cache_key(a=1, b="u")


def test_computed_once_then_loaded(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path)
    compute, calls = counting(1.0)
    first = cache.get_or_compute("kind", "k1", compute, meta={"texts": 2})
    second = TensorCache(tmp_path).get_or_compute("kind", "k1", compute)
    assert len(calls) == 1 and torch.equal(first["x"], second["x"])
    assert (tmp_path / "kind-k1" / "meta.json").read_text().strip().startswith("{")


def test_a_damaged_entry_is_recomputed(tmp_path: Path) -> None:
    cache = TensorCache(tmp_path)
    compute, calls = counting(2.0)
    cache.get_or_compute("kind", "k1", compute)
    (tmp_path / "kind-k1" / "tensors.safetensors").write_bytes(b"not safetensors")
    again = cache.get_or_compute("kind", "k1", compute)
    assert len(calls) == 2 and torch.equal(again["x"], torch.full((2, 3), 2.0))


def test_layered_cache_reads_the_read_only_folder_and_writes_only_its_own(tmp_path: Path) -> None:
    shipped, own = tmp_path / "shipped", tmp_path / "own"
    TensorCache(shipped).get_or_compute("kind", "k1", counting(3.0)[0])
    before = sorted(p.name for p in shipped.iterdir())
    layered = LayeredCache(own, [shipped])
    compute, calls = counting(9.0)
    assert torch.equal(layered.get_or_compute("kind", "k1", compute)["x"], torch.full((2, 3), 3.0))
    layered.get_or_compute("kind", "k2", compute)
    assert len(calls) == 1
    assert sorted(p.name for p in shipped.iterdir()) == before
    assert (own / "kind-k2").is_dir() and not (own / "kind-k1").exists()
