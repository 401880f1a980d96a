"""Quality-benchmark peers: the static model distilled from a teacher (model2vec-style) and BM25."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_helpers import load_teacher, write_dataset, write_teacher

from retrieval_head.evaluation.peers import (
    BM25Peer,
    StaticPeer,
    batch1_latency,
    distill_vocabulary,
    pca,
    special_affixes,
    token_outputs,
    zipf_sif_weights,
)
from retrieval_head.io.tensor_cache import TensorCache
from retrieval_head.retrieval.data import Query, RetrievalDataset, load_dataset_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("peers")
    return SimpleNamespace(teacher=load_teacher(write_teacher(root / "teacher")),
                           data=load_dataset_folder(write_dataset(root / "data")), root=root)


def test_zipf_sif_weights_follow_model2vec() -> None:
    w = zipf_sif_weights(5, 1e-4)
    p = (1 / np.arange(2, 7)) / (1 / np.arange(2, 7)).sum()
    np.testing.assert_allclose(w, 1e-4 / (1e-4 + p))
    assert np.all(np.diff(w) > 0)  # rarer (later) tokens weigh more
    np.testing.assert_array_equal(zipf_sif_weights(4, None), np.ones(4))


def test_pca_centres_rotates_and_reduces() -> None:
    x = np.random.default_rng(0).normal(size=(50, 6)) * np.array([5, 4, 3, 2, 1, 0.5])
    full = pca(x, 6)
    centred = x - x.mean(0)
    np.testing.assert_allclose(full @ full.T, centred @ centred.T, rtol=1e-4, atol=1e-3)  # a rotation
    reduced = pca(x, 2)
    assert reduced.shape == (50, 2)
    top = np.sort(np.linalg.eigvalsh(np.cov(centred.T, bias=True)))[::-1][:2]
    np.testing.assert_allclose(reduced.var(0), top, rtol=1e-4)  # the two directions of greatest variance
    small = x[:3]
    assert pca(x, None) is x and pca(small, 6) is small  # no PCA: off, or fewer tokens than dims (model2vec)


def test_vocabulary_and_affixes_of_a_bert_tokenizer(tiny: SimpleNamespace) -> None:
    tok = tiny.teacher.tokenizer
    ids = distill_vocabulary(tok, r"\[unused\d+\]")
    kept = tok.convert_ids_to_tokens(ids)
    assert kept[:2] == ["[PAD]", "[UNK]"] and {"[CLS]", "[SEP]", "[MASK]"}.isdisjoint(kept)
    assert ids == sorted(ids) and len(ids) == len(tok.get_vocab()) - 3
    assert distill_vocabulary(tok, r"ho") == [i for i in ids if not tok.convert_ids_to_tokens(i).startswith("ho")]
    assert special_affixes(tok) == ([tok.cls_token_id], [tok.sep_token_id])


def test_distilled_rows_are_weighted_mean_pooled_token_outputs(tiny: SimpleNamespace) -> None:
    tok, bert = tiny.teacher.tokenizer, tiny.teacher[0].auto_model
    peer = StaticPeer.distill(tiny.teacher, pca_dims=None, float16=False)
    ids = distill_vocabulary(tok, r"\[unused\d+\]")
    assert peer.token_ids.tolist() == ids and peer.dim == 16
    weights = zipf_sif_weights(len(ids), 1e-4)
    for rank in (0, 1, 7, len(ids) - 1):  # each token alone, wrapped in [CLS] ... [SEP], mean over positions
        with torch.inference_mode():
            hidden = bert(input_ids=torch.tensor([[tok.cls_token_id, ids[rank], tok.sep_token_id]])).last_hidden_state
        np.testing.assert_allclose(peer.vectors[rank], weights[rank] * hidden[0].mean(0).numpy(), rtol=1e-4,
                                   atol=1e-6)


def test_distillation_is_cached_by_teacher_and_settings(tiny: SimpleNamespace) -> None:
    cache = TensorCache(tiny.root / "cache")
    first = StaticPeer.distill(tiny.teacher, pca_dims=8, cache=cache)
    again = StaticPeer.distill(tiny.teacher, pca_dims=8, cache=cache)
    assert first.source.startswith("distilled, cached") and again.source.startswith("read from the cache")
    assert first.vectors.shape == (len(first.token_ids), 8)
    np.testing.assert_array_equal(first.vectors, again.vectors)
    other = StaticPeer.distill(tiny.teacher, pca_dims=4, cache=cache)
    assert other.dim == 4 and len(list(Path(cache.root).iterdir())) == 2
    other_teacher = load_teacher(write_teacher(tiny.root / "other", seed=1))
    assert StaticPeer.distill(other_teacher, pca_dims=8, cache=cache).source.startswith("distilled")


def test_sentence_vector_is_the_normalised_mean_of_its_token_rows(tiny: SimpleNamespace) -> None:
    tok = tiny.teacher.tokenizer
    ids = distill_vocabulary(tok, None)
    peer = StaticPeer(np.random.default_rng(0).normal(size=(len(ids), 5)), ids, tok)
    rows = {i: r for r, i in enumerate(ids)}

    def expected(token_ids: list[int]) -> np.ndarray:
        mean = peer.vectors[[rows[i] for i in token_ids]].mean(0)
        return mean / np.linalg.norm(mean)

    text = "hotel parking zebra-crossing wifi"  # unknown words become [UNK], which is dropped
    token_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id in token_ids
    vec = peer.encode(text)
    assert vec.shape == (5,)
    np.testing.assert_allclose(vec, expected([i for i in token_ids if i != tok.unk_token_id]), rtol=1e-5)
    both = peer.encode([text, "qwxyz"])
    np.testing.assert_allclose(both[0], vec, rtol=1e-6)
    np.testing.assert_array_equal(both[1], np.zeros(5))  # nothing known: zeros, as in model2vec


def test_texts_are_cut_like_model2vec(tiny: SimpleNamespace) -> None:
    """At most max_length tokens, after a cut to max_length x the median token length in characters."""
    tok = tiny.teacher.tokenizer
    ids = distill_vocabulary(tok, None)
    peer = StaticPeer(np.eye(len(ids)), ids, tok, max_length=2)
    limit = 2 * peer.median_token_length
    assert peer.tokenize(["a i a i pool"])[0].tolist() == [ids.index(tok.convert_tokens_to_ids(w)) for w in "ai"]
    word = "restaurant"
    assert len(word) > limit and peer.tokenize([word])[0].size == 0  # cut mid-word: an unknown piece, dropped


def test_static_peer_indexes_documents_and_retrieves(tiny: SimpleNamespace) -> None:
    tok = tiny.teacher.tokenizer
    ids = distill_vocabulary(tok, None)
    peer = StaticPeer(np.eye(len(ids)), ids, tok)  # one axis per token: retrieval by shared words
    metrics = peer.evaluate(tiny.data, {q.id: q.flat_text() for q in tiny.data.queries})
    assert metrics["recall@10"] == 1.0 and metrics["ndcg@10"] > 0.8
    index = peer.index(tiny.data)
    assert len(index) == len(tiny.data.corpus) and index.dim == len(ids)
    assert peer.evaluate(tiny.data, index=index) == metrics  # flat_text is the default query text


def small_corpus() -> RetrievalDataset:
    corpus = {
        "common": {"title": "the hotel", "text": "the hotel has a room and the room has a view"},
        "rare": {"title": "the hotel", "text": "the hotel has a heliport on the roof"},
        "other": {"title": "a park", "text": "the park has a lake and a view"},
    }
    queries = [Query("q0", "is there a heliport at the hotel"), Query("q1", "a lake in the park")]
    return RetrievalDataset(corpus, queries, {"q0": {"rare": 1}, "q1": {"other": 1}})


def test_bm25_ranks_the_document_sharing_the_rare_word_first() -> None:
    from rank_bm25 import BM25Okapi

    from retrieval_head.evaluation.evaluator import tokenize

    data = small_corpus()
    peer = BM25Peer(data)
    scores = peer.scores("is there a heliport at the hotel")
    assert peer.doc_ids[int(np.argmax(scores))] == "rare"
    reference = BM25Okapi([tokenize(t) for t in data.document_texts()])
    np.testing.assert_allclose(scores, reference.get_scores(tokenize("is there a heliport at the hotel")))
    metrics = peer.evaluate(data)
    assert metrics["ndcg@10"] == 1.0 and metrics["mrr@10"] == 1.0
    swapped = peer.evaluate(data, {"q0": "a lake in the park", "q1": "a heliport"})  # the given texts are scored
    assert swapped["mrr@10"] < 1.0


def test_batch1_latency_visits_paths_in_turn() -> None:
    calls: list[tuple[str, str]] = []
    paths = {name: (lambda t, name=name: calls.append((name, t))) for name in ("a", "b")}
    seconds = batch1_latency(paths, ["x", "y", "z"], warmup=1)
    assert calls[:2] == [("a", "x"), ("b", "x")]  # the untimed warm-up
    assert calls[2:] == [("a", "x"), ("b", "x"), ("a", "y"), ("b", "y"), ("a", "z"), ("b", "z")]
    assert {k: len(v) for k, v in seconds.items()} == {"a": 3, "b": 3} and all(s >= 0 for s in seconds["a"])


@pytest.mark.real_model
def test_token_outputs_match_the_real_teacher_on_single_tokens(embedded_teacher) -> None:
    """On all-MiniLM-L6-v2 a one-token text is exactly `[CLS] token [SEP]` mean-pooled and normalised, so the
    distillation's token outputs, normalised, are the teacher's own embeddings of those words."""
    tok = embedded_teacher.tokenizer
    words = ["hotel", "parking", "breakfast", "virus", "protein"]
    ids = [tok.convert_tokens_to_ids(w) for w in words]
    assert tok.unk_token_id not in ids
    prefix, suffix = special_affixes(tok)
    out = token_outputs(embedded_teacher[0].auto_model, [[*prefix, i, *suffix] for i in ids], batch_size=2)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    np.testing.assert_allclose(out, embedded_teacher.encode(words, convert_to_numpy=True), atol=1e-5)
