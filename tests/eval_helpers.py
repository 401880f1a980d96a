"""Tiny stand-ins written to disk for the compare / eval-command tests: a dataset in the uniform format, a
sentence-transformers teacher (tiny BERT + mean pooling + normalise) and a head on a tiny llama. No downloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

WORDS = [
    "hotel", "restaurant", "parking", "wifi", "breakfast", "pool", "garden", "pizza", "pasta", "museum", "park",
    "lake", "station", "room", "price", "vegetarian", "pets", "quiet", "noisy", "cheap", "expensive", "open", "late",
    "early", "view", "sea", "city", "centre", "bar", "gym", "spa", "dinner",
]


def write_dataset(folder: Path, docs: int = 12, queries: int = 30) -> Path:
    """Docs with two distinctive words each; queries ask for one doc's words, every other one with history
    that names the doc (the question alone is then ambiguous)."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus, records, qrels = [], [], []
    for i in range(docs):
        a, b = WORDS[(2 * i) % len(WORDS)], WORDS[(2 * i + 1) % len(WORDS)]
        corpus.append({"id": f"d{i}", "title": f"place {a}", "text": f"a place with {a} and {b}"})
    for i in range(queries):
        d = i % docs
        a, b = WORDS[(2 * d) % len(WORDS)], WORDS[(2 * d + 1) % len(WORDS)]
        history = [f"I want the place with {a}", "Sure, what would you like to know?"] if i % 2 else []
        records.append({"id": f"q{i}", "text": f"does it have {b}?" if history else f"{a} {b}",
                        "history": history})
        qrels.append(f"q{i}\td{d}\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "qrels.tsv").write_text("\n".join(qrels) + "\n")
    return folder


def write_teacher(folder: Path, seed: int = 0, max_seq_length: int = 32) -> Path:
    """A tiny sentence-transformers model (random 1-layer BERT, hidden 16, WordPiece over WORDS) saved to
    `folder`; different seeds give different embedding spaces (fingerprints)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizer

    bert_dir = folder.parent / f"{folder.name}-bert"
    bert_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(WORDS) | {
        "a", "place", "with", "and", "i", "want", "the", "does", "it", "have", "?", ",", "sure", "what", "would",
        "you", "like", "to", "know", "mitochondria", "capital", "of", "france", "fox", "dog"})]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(bert_dir)
    tokenizer.save_pretrained(bert_dir)
    transformer = Transformer(str(bert_dir), max_seq_length=max_seq_length)
    model = SentenceTransformer(modules=[transformer, Pooling(16, "mean"), Normalize()], device="cpu")
    model.save(str(folder))
    return folder


def load_teacher(folder: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def write_head(folder: Path, teacher_dir: Path, base_dir: Path, **config: Any) -> Path:
    """A fresh (untrained) head on the tiny llama saved in `base_dir`, fingerprinted against the teacher."""
    from tiny import save_tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrieval_head import RetrievalHeadConfig, get_retrieval_model
    from retrieval_head.retrieval.fingerprint import TeacherFingerprint

    if not (base_dir / "config.json").exists():
        save_tiny(base_dir)
    fingerprint = TeacherFingerprint.from_sentence_transformer(load_teacher(teacher_dir), teacher_id=str(teacher_dir))
    settings: dict[str, Any] = dict(output_dim=fingerprint.dim, inner_dim=32, dropout=0.0, max_length=64,
                                    base_model_name_or_path=str(base_dir), teacher=fingerprint.to_dict())
    settings.update(config)
    model = get_retrieval_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                RetrievalHeadConfig(**settings), tokenizer=AutoTokenizer.from_pretrained(base_dir))
    model.save_pretrained(folder)
    return folder
