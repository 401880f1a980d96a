"""Pseudo-queries (doc2query): few-shot prompts, batched left-padded generation, the command's text file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import save_tiny, tiny_causal_lm, tiny_tokenizer

from retrieval_head.cli import main
from retrieval_head.training.pseudo_queries import STYLES, generate_replies, usable, write_pseudo_queries

TEXTS = ["the room has free parking and a quiet garden", "breakfast is served from seven until ten",
         "pets are not allowed in the rooms"]


def test_only_the_first_line_of_a_querys_length_is_kept():
    assert usable('"Does the hotel have parking?"\nMore text') == "Does the hotel have parking?"
    assert usable("Parking?") == "" and usable(" ".join(["word"] * 41)) == ""


def test_the_prompt_shows_the_examples_then_the_passage():
    messages = STYLES["claim"].messages("Aspirin lowers fever.")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[-1]["content"].startswith("Text: Aspirin lowers fever.")
    assert messages[1]["content"] == STYLES["claim"].examples[0][1]


def test_a_batch_writes_what_each_text_alone_would():
    model, tokenizer = tiny_causal_lm(), tiny_tokenizer()
    tokenizer.padding_side, tokenizer.pad_token = "right", None
    batched = generate_replies(model, tokenizer, TEXTS, STYLES["question"], batch_size=3, max_new_tokens=12)
    alone = [r for t in TEXTS for r in generate_replies(model, tokenizer, [t], STYLES["question"], max_new_tokens=12)]
    assert batched == alone and len(batched) == len(TEXTS) and all(batched)  # left padding changes no row
    assert tokenizer.padding_side == "right" and tokenizer.pad_token is None  # restored
    assert write_pseudo_queries(model, tokenizer, TEXTS, max_new_tokens=12) == [usable(r) for r in batched]


def test_the_command_writes_one_query_a_line(tmp_path: Path, capsys):
    base = save_tiny(tmp_path / "base")
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                                               for i, t in enumerate(TEXTS)))
    out = tmp_path / "pq.txt"
    assert main(["pseudo-queries", "--data", str(data), "--out", str(out), "--base", str(base), "--quiet"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) <= len(TEXTS) and all(usable(line) == line for line in lines)
    assert f"wrote {len(lines)} pseudo-queries" in capsys.readouterr().out
    assert main(["pseudo-queries", "--data", str(data), "--out", str(out), "--count", "0"]) == 2
    assert main(["pseudo-queries", "--data", str(data), "--out", str(out), "--base", str(tmp_path / "no-lm")]) == 2
    assert main(["pseudo-queries", "--data", str(tmp_path / "none"), "--out", str(out)]) == 2


@pytest.mark.real_model
def test_smollm2_writes_in_domain_questions_from_the_examples(embedded_agent):
    from retrieval_head.retrieval.data import load_corpus

    model, tokenizer = embedded_agent
    corpus = load_corpus(Path(__file__).resolve().parents[2] / "data/dstc11_track5_val_reviewdoc/corpus.jsonl")
    docs = [corpus[d] for d in sorted(corpus)[:: len(corpus) // 4][:4]]
    queries = write_pseudo_queries(model, tokenizer, [f"{d['title']} {d['text']}" for d in docs], STYLES["question"],
                                   max_new_tokens=24)
    questions = [q for q in queries if q.endswith("?")]
    assert len(questions) >= 3, queries  # zero-shot, SmolLM2-135M apologised or repeated the instruction instead
    assert any(d["title"].lower() in q.lower() for d, q in zip(docs, queries, strict=True)), queries
