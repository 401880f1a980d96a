"""Tiny stand-ins for training tests: a bag-of-tokens teacher, a tiny dataset folder and a tiny recipe."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (for tiny.py) when run as a script

from tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402

from retrieval_head.training.recipe import Recipe  # noqa: E402

WORDS = sorted({w for s in [
    "where can I park my car near the hotel", "is breakfast included in the price of the room",
    "the restaurant serves vegetarian food and has outdoor seating", "do they allow pets in the guest house",
    "what is the capital of France", "claims about proteins and cells in biomedical abstracts",
] for w in s.split()})


class FakeTeacher:
    """A deterministic sentence-transformers look-alike: mean of fixed random token vectors, L2-normalised."""

    similarity_fn_name = "cosine"

    def __init__(self, dim: int = 16, seed: int = 0, max_seq_length: int = 48) -> None:
        self.tokenizer = tiny_tokenizer(chat=False)
        self.max_seq_length = max_seq_length
        self.table = torch.randn(len(self.tokenizer), dim, generator=torch.Generator().manual_seed(seed))
        self.model_card_data = SimpleNamespace(base_model="fake/teacher", base_model_revision=None)

    def encode(self, texts, batch_size=32, convert_to_tensor=False, convert_to_numpy=True,
               show_progress_bar=False, normalize_embeddings=False, **kwargs):
        single = isinstance(texts, str)
        rows = []
        for text in [texts] if single else texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.max_seq_length:] or [0]
            rows.append(torch.nn.functional.normalize(self.table[ids].mean(0), dim=0))
        out = torch.stack(rows)
        out = out[0] if single else out
        return out if convert_to_tensor else np.asarray(out)


def write_tiny_dataset(folder: Path, docs: int = 24, queries: int = 60, conversational: bool = True,
                       seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [{"id": f"d{i}", "title": f"doc {i}", "text": " ".join(rng.sample(WORDS, 8)) + "."} for i in range(docs)]
    records, qrels = [], []
    for i in range(queries):
        doc = corpus[i % docs]
        history = [f"turn {i} " + " ".join(rng.sample(WORDS, 4)), " ".join(rng.sample(WORDS, 3))] \
            if conversational and i % 2 else []
        records.append({"id": f"q{i}", "text": " ".join(rng.sample(doc["text"].rstrip(".").split(), 3)),
                        "history": history})
        qrels.append(f"q{i}\t{doc['id']}\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in records))
    (folder / "qrels.tsv").write_text("\n".join(qrels) + "\n")
    return folder


def tiny_recipe(root: Path, **overrides) -> Recipe:
    """A recipe over `root/data/tiny` with a tiny llama (hidden 32, 3 layers) and the 16-dim fake teacher."""
    write_tiny_dataset(root / "data" / "tiny")
    recipe = Recipe.from_dict({
        "name": "tiny",
        "base": {"model": "tiny/llama"},
        "teacher": {"model": "fake/teacher", "batch_size": 16},
        "head": {"layer": 3, "pooling": "mean", "head_type": "mlp", "inner_dim": 32, "num_attention_heads": 4,
                 "dropout": 0.1, "max_length": 64},
        "features": {"layers": [1, 2, 3], "poolings": ["mean", "last_token"], "token_layer": 3, "batch_size": 8,
                     "cache_dir": str(root / "cache")},
        "data": {"root": str(root / "data"), "datasets": ["tiny"], "eval_datasets": ["tiny"], "oversample": {},
                 "dev_fraction": 0.2, "test_fraction": 0.2},
        "loss": {"top_k": 8},
        "train": {"lr": 1e-3, "batch_size": 8, "max_steps": 12, "eval_every": 4, "save_every": 4, "log_every": 1,
                  "warmup_ratio": 0.1},
    }, source="tiny recipe")
    return recipe.replace(**overrides) if overrides else recipe


def tiny_models():
    """(base, tokenizer, teacher) for `Trainer(..., base=, tokenizer=, teacher=)`."""
    return tiny_causal_lm("llama"), tiny_tokenizer(), FakeTeacher()
