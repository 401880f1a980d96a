"""`retrieval-head chat`: search-first by default, hits and the time split per turn, the cache reused across turns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tiny import save_tiny, tiny_causal_lm, tiny_tokenizer

from retrieval_head import RetrievalHeadConfig, get_retrieval_model
from retrieval_head.cli import main
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.retrieval.index import DocumentIndex

FINGERPRINT = TeacherFingerprint("tiny-teacher", None, 16, "cosine", True, "a" * 64)


def make_chat_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A tiny head (its base saved by path), a 6-document index and its corpus."""
    base_dir = save_tiny(tmp_path / "base")
    config = RetrievalHeadConfig(layer=2, output_dim=16, inner_dim=32, teacher=FINGERPRINT.to_dict(),
                                 base_model_name_or_path=str(base_dir))
    get_retrieval_model(tiny_causal_lm(), config, tokenizer=tiny_tokenizer()).save_pretrained(tmp_path / "head")
    vectors = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    DocumentIndex.from_embeddings(vectors, [f"d{i}" for i in range(6)], FINGERPRINT).save(tmp_path / "index")
    data = tmp_path / "data"
    data.mkdir()
    (data / "corpus.jsonl").write_text("".join(f'{{"id": "d{i}", "title": "Doc {i}", "text": "text {i}"}}\n'
                                               for i in range(6)))
    return tmp_path / "head", tmp_path / "index", data


def test_search_first_chat_shows_hits_and_time_split_and_reuses_the_cache(tmp_path: Path, capsys) -> None:
    head, index, data = make_chat_files(tmp_path)
    code = main(["chat", "--head", str(head), "--index", str(index), "--data", str(data),
                 "--message", "where can I park", "--message", "is it free", "--max-answer-tokens", "3", "-k", "1",
                 "--passage-chars", "12", "--json"])
    assert code == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:])
    for turn in (first, second):
        assert turn["mode"] == "search-first" and turn["searched_with"] == "user_turn"
        assert turn["hits"][0]["doc_id"].startswith("d") and turn["hits"][0]["title"].startswith("Doc ")
        assert set(turn["timings_ms"]) == {"prefill_s", "embed_s", "search_s", "first_token_s", "answer_s", "total_s"}
    assert 0 < first["tokens"]["reused"] < second["tokens"]["reused"]  # the template's prefix, then the first turn
    assert second["tokens"]["forward_passes"] >= 2  # the prefill of the new message, then the answer


def test_chat_with_cached_passages_computes_each_passage_once(tmp_path: Path, capsys) -> None:
    head, index, data = make_chat_files(tmp_path)
    code = main(["chat", "--head", str(head), "--index", str(index), "--data", str(data), "--cache-passages",
                 "--message", "where can I park", "--message", "is it free", "--max-answer-tokens", "3", "-k", "3",
                 "--passage-chars", "12", "--json"])
    assert code == 0
    first, second = (json.loads(line)["tokens"] for line in capsys.readouterr().out.strip().splitlines()[-2:])
    assert first["passages_first_seen"] == first["passages_reused"] > 0  # nothing was cached before
    for turn in (first, second):  # the prefill, one batch of first-seen passages if any, then the answer
        assert turn["forward_passes"] == 1 + (turn["passages_first_seen"] > 0) + turn["answer"]
