"""Peers the head is reported beside in the quality benchmark: a static model distilled from the same teacher
(model2vec-style) and BM25. Each embeds / scores queries AND documents itself; neither reads the teacher's index.

`StaticPeer.distill` is a REPRODUCTION of model2vec's `distill` (MinishLab/model2vec, `distill/distillation.py`
and `distill/inference.py`, default settings), not the package itself: model2vec's `distill` extra pins
transformers < 5.4, older than the transformers this project needs, so it cannot be installed beside it. The
steps follow model2vec's source:

1. vocabulary: the teacher tokenizer's tokens in id order, without its added tokens other than [UNK] / [PAD]
   (model2vec prunes them, and drops [CLS] / [SEP] once it removes the post-processor) and without tokens
   matching `token_remove_pattern` (default `[unused\\d+]`);
2. every token is its own input, wrapped in the tokenizer's special tokens (`[CLS] token [SEP]`), run through
   the teacher's transformer; the output is the mean of the last hidden states over all positions (the
   sentence-transformers modules after the transformer - pooling, normalisation - are not used, as in model2vec);
3. PCA to `pca_dims` (256) dimensions (centred, full SVD, like sklearn's `PCA(svd_solver="full")`);
4. SIF weighting with Zipf frequencies: the token of rank r (its position in the vocabulary, from 0) gets
   p = (1 / (r + 2)) / sum, weight = sif / (sif + p) with sif = 1e-4; rows are multiplied by their weight;
5. the table is stored in float16 (model2vec's default `quantize_to`).

A sentence is then, as in model2vec's `StaticModel.encode`: its text cut to `max_length * median token length`
characters, tokenised without special tokens, [UNK] dropped, at most `max_length` (512) tokens, the mean of their
rows (taken in float32 here), L2-normalised. Deviations: tokens outside the table (the pruned special tokens,
which this tokenizer only emits for their literal text) are dropped rather than re-tokenised; the mean is float32.
Checked once against model2vec 0.10.0's own `distill_from_model` on all-MiniLM-L6-v2 (installed apart from this
environment, without its dependencies): the same 29,525 x 256 table up to the signs of the PCA axes and float16
rounding (max abs difference 0.002), the same token ids on test texts, sentence cosines >= 0.9998.

`BM25Peer` is rank-bm25's BM25Okapi (k1 1.5, b 0.75, epsilon 0.25; exact scores, laid out as a sparse matrix by
`BM25Baseline`) over title + text, scoring the query text it is given.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from retrieval_head.evaluation.evaluator import BM25Baseline, RetrievalEvaluator
from retrieval_head.io.tensor_cache import TensorCache, cache_key
from retrieval_head.retrieval.data import RetrievalDataset
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.retrieval.index import DocumentIndex

logger = logging.getLogger(__name__)

DISTILL_VERSION = 1  # part of the cache key: bump it when the distillation below changes
CACHE_KIND = "static-peer"


def zipf_sif_weights(n: int, sif_coefficient: float | None) -> np.ndarray:
    """model2vec's `compute_weights`: SIF weights sif / (sif + p) with Zipf probabilities p of ranks 0..n-1."""
    if sif_coefficient is None:
        return np.ones(n)
    inv_rank = 1.0 / np.arange(2, n + 2)
    proba = inv_rank / inv_rank.sum()
    return sif_coefficient / (sif_coefficient + proba)


def pca(embeddings: np.ndarray, dims: int | None) -> np.ndarray:
    """model2vec's `apply_pca`: centred PCA to `dims` components (all of them when `dims` exceeds the width;
    none at all when `dims` is None or not below the number of rows)."""
    if dims is None:
        return embeddings
    dims = min(dims, embeddings.shape[1])
    if dims >= embeddings.shape[0]:
        logger.warning("PCA to %d dims needs more than %d tokens; not applying PCA", dims, embeddings.shape[0])
        return embeddings
    x = np.asarray(embeddings, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return (x @ vt[:dims].T).astype(np.float32)


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before / after a single sequence (e.g. ([CLS], [SEP]) for BERT)."""
    core = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(core) + 1):
        if full[start:start + len(core)] == core:
            return list(full[:start]), list(full[start + len(core):])
    raise ValueError("cannot find the tokenizer's special tokens around a sequence")


def distill_vocabulary(tokenizer: Any, token_remove_pattern: str | None) -> list[int]:
    """Ids of the tokens to embed, in id order: the vocabulary less added tokens other than unk / pad and less
    tokens matching `token_remove_pattern` (model2vec's pruning)."""
    keep_added = {tokenizer.unk_token_id, tokenizer.pad_token_id} - {None}
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) - keep_added
    regex = re.compile(token_remove_pattern) if token_remove_pattern else None
    ids = []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token_id in added or (regex is not None and regex.match(token)):
            continue
        ids.append(token_id)
    if not ids:
        raise ValueError("the vocabulary is empty after pruning; check token_remove_pattern")
    return ids


@torch.inference_mode()
def token_outputs(transformer: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_token_id: int = 0,
                  batch_size: int = 256, show_progress_bar: bool = False) -> np.ndarray:
    """Mean-pooled last hidden state of each id sequence run alone through `transformer` (model2vec's
    `create_embeddings` with mean pooling), in input order."""
    from tqdm.auto import tqdm

    transformer = transformer.eval()
    device = next(transformer.parameters()).device
    with_types = "token_type_ids" in inspect.signature(transformer.forward).parameters
    order = np.argsort([len(s) for s in sequences], kind="stable")
    out = np.zeros((len(sequences), transformer.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), disable=not show_progress_bar, desc="Embedding tokens"):
        batch = [sequences[i] for i in order[start:start + batch_size]]
        width = max(len(s) for s in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if with_types:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        hidden = transformer(**inputs).last_hidden_state.float()
        weights = inputs["attention_mask"].float()
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1.0)
        out[order[start:start + batch_size]] = torch.bmm(weights[:, None, :], hidden).squeeze(1).cpu().numpy()
    return np.nan_to_num(out)


class StaticPeer:
    """A static embedding model distilled from a sentence-transformers teacher (a reproduction of model2vec's
    `distill`, see the module docstring): one vector per token; a text is the normalised mean of its tokens'
    rows. It has a sentence-transformers-like `encode`, so `DocumentIndex.build` can index documents with it."""

    similarity_fn_name = "cosine"

    def __init__(self, vectors: np.ndarray, token_ids: Sequence[int], tokenizer: Any, *,
                 max_length: int | None = 512, teacher_id: str = "unknown",
                 settings: Mapping[str, Any] | None = None) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        token_ids = np.asarray(token_ids, dtype=np.int64)
        if vectors.ndim != 2 or len(vectors) != len(token_ids):
            raise ValueError(f"{vectors.shape} vectors for {len(token_ids)} token ids")
        self.vectors = vectors
        self.token_ids = token_ids
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.teacher_id = teacher_id
        self.settings = dict(settings or {})
        self.source = "given"  # how the table was obtained: given, distilled, or read from a cache
        self.rows = np.full(max(int(token_ids.max()), max(tokenizer.get_vocab().values())) + 1, -1, dtype=np.int64)
        self.rows[token_ids] = np.arange(len(token_ids))
        if tokenizer.unk_token_id is not None:
            self.rows[tokenizer.unk_token_id] = -1  # model2vec drops [UNK] from encoded texts
        tokens = tokenizer.convert_ids_to_tokens(token_ids.tolist())
        self.median_token_length = int(np.median([len(t) for t in tokens]))
        self._backend = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a copy without truncation / padding, called directly like model2vec does
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def distill(cls, teacher: Any, *, pca_dims: int | None = 256, sif_coefficient: float | None = 1e-4,
                token_remove_pattern: str | None = r"\[unused\d+\]", float16: bool = True,
                max_length: int | None = 512, batch_size: int = 256, cache: TensorCache | None = None,
                fingerprint: TeacherFingerprint | None = None, show_progress_bar: bool = False) -> StaticPeer:
        """Distil a static model from `teacher` (a SentenceTransformer whose first module holds `auto_model` and
        `tokenizer`). With `cache`, the table is stored under a key of the teacher's fingerprint and the settings
        and reused; `fingerprint` saves measuring it (it must be the teacher's)."""
        if sif_coefficient is not None and not 0 < sif_coefficient < 1:
            raise ValueError(f"sif_coefficient must be in (0, 1), got {sif_coefficient}")
        tokenizer = teacher.tokenizer
        settings = {"pca_dims": pca_dims, "sif_coefficient": sif_coefficient, "float16": float16,
                    "token_remove_pattern": token_remove_pattern}
        fingerprint = fingerprint or TeacherFingerprint.from_sentence_transformer(teacher)

        def compute() -> dict[str, torch.Tensor]:
            start = time.perf_counter()
            ids = distill_vocabulary(tokenizer, token_remove_pattern)
            prefix, suffix = special_affixes(tokenizer)
            outputs = token_outputs(teacher[0].auto_model, [[*prefix, i, *suffix] for i in ids],
                                    pad_token_id=tokenizer.pad_token_id or 0, batch_size=batch_size,
                                    show_progress_bar=show_progress_bar)
            weights = zipf_sif_weights(len(ids), sif_coefficient)
            vectors = (pca(outputs, pca_dims) * weights[:, None]).astype(np.float16 if float16 else np.float32)
            logger.info("Distilled a static model (%d tokens x %d dims) from %s in %.1f s", len(ids),
                        vectors.shape[1], fingerprint.describe(), time.perf_counter() - start)
            return {"vectors": torch.from_numpy(vectors), "token_ids": torch.tensor(ids, dtype=torch.long)}

        source = "distilled"
        if cache is None:
            tensors = compute()
        else:
            key = cache_key(kind=CACHE_KIND, version=DISTILL_VERSION, teacher=fingerprint.to_dict(), **settings)
            if cache.load(CACHE_KIND, key) is not None:
                source = f"read from the cache {cache.path(CACHE_KIND, key)}"
            else:
                source = f"distilled, cached in {cache.path(CACHE_KIND, key)}"
            tensors = cache.get_or_compute(CACHE_KIND, key, compute,
                                           meta={"teacher": fingerprint.to_dict(), "version": DISTILL_VERSION,
                                                 **settings})
        peer = cls(tensors["vectors"].float().numpy(), tensors["token_ids"].numpy(), tokenizer,
                   max_length=max_length, teacher_id=fingerprint.teacher_id, settings=settings)
        peer.source = source
        return peer

    def tokenize(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Rows of each text's tokens (model2vec's `tokenize`: character pre-cut, no special tokens, [UNK] and
        tokens outside the table dropped, then at most `max_length` tokens)."""
        if self.max_length is not None:
            limit = self.max_length * self.median_token_length
            texts = [t[:limit] for t in texts]
        if self._backend is not None:
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
            id_lists = [e.ids for e in encode(list(texts), add_special_tokens=False)]
        else:
            id_lists = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        out = []
        for ids in id_lists:
            rows = self.rows[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, dtype=np.int64)
            rows = rows[rows >= 0]
            out.append(rows[: self.max_length] if self.max_length is not None else rows)
        return out

    def encode(self, sentences: str | Sequence[str], batch_size: int = 1024, convert_to_numpy: bool = True,
               normalize_embeddings: bool = True, show_progress_bar: bool = False, **kwargs: Any) -> np.ndarray:
        """Sentence vectors (n, dim), or (dim,) for one string: the mean of the tokens' rows, L2-normalised
        (always, as model2vec's distilled models do; a text with no known token gives zeros). The other
        arguments are accepted for sentence-transformers compatibility."""
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            for i, rows in enumerate(self.tokenize(texts[start:start + batch_size]), start):
                if len(rows):
                    out[i] = self.vectors[rows].mean(axis=0)
        out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-32
        return out[0] if single else out

    def fingerprint(self) -> TeacherFingerprint:
        """The fingerprint of this model's own embedding space (for the index of its document vectors)."""
        return TeacherFingerprint.from_sentence_transformer(self, teacher_id=f"static-distilled:{self.teacher_id}")

    def index(self, dataset: RetrievalDataset, batch_size: int = 1024) -> DocumentIndex:
        """A flat index of `dataset`'s documents (title + text) embedded by this model."""
        return DocumentIndex.build(self, dataset, fingerprint=self.fingerprint(), batch_size=batch_size)

    def evaluate(self, dataset: RetrievalDataset, query_texts: Mapping[str, str] | None = None,
                 index: DocumentIndex | None = None, **metric_kwargs: Any) -> dict[str, float]:
        """Mean metrics (the repo's `RetrievalEvaluator`) of this model embedding both the queries - the given
        text per query id, else `Query.flat_text()` - and the documents (`index`, built when not given)."""
        index = index or self.index(dataset)
        evaluator = RetrievalEvaluator(dataset, index, **metric_kwargs)
        texts = [query_texts[q.id] if query_texts is not None else q.flat_text() for q in evaluator.queries]
        return evaluator.evaluate(self.encode(texts))


class BM25Peer:
    """BM25 over a dataset's documents (title + text): rank-bm25's BM25Okapi scores through `BM25Baseline`."""

    def __init__(self, dataset: RetrievalDataset, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25) -> None:
        self.baseline = BM25Baseline(dataset, k1=k1, b=b, epsilon=epsilon)
        self.doc_ids = self.baseline.doc_ids

    def scores(self, query_text: str) -> np.ndarray:
        """The BM25 score of every document (corpus order) for one query text: all a query costs BM25."""
        return self.baseline.scores(query_text)

    def evaluate(self, dataset: RetrievalDataset, query_texts: Mapping[str, str] | None = None,
                 **metric_kwargs: Any) -> dict[str, float]:
        """Mean metrics over `dataset`'s queries with a relevant document (the metric definitions of
        `retrieval_head.evaluation`), scoring the given text per query id, else `Query.flat_text()`."""
        relevant = dataset.relevant_docs()
        queries = dataset.subset([q.id for q in dataset.queries if q.id in relevant])
        query_format = (lambda q: query_texts[q.id]) if query_texts is not None else "flat"
        return self.baseline.evaluate(queries, query_format=query_format, **metric_kwargs)


def batch1_latency(paths: Mapping[str, Callable[[str], Any]], texts: Sequence[str],
                   warmup: int = 3) -> dict[str, list[float]]:
    """Seconds each path takes on one text at a time, the paths visited in turn on every text (so drifting load
    falls on all of them alike); the first `warmup` texts are run untimed."""
    for text in texts[:warmup]:
        for fn in paths.values():
            fn(text)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for text in texts:
        for name, fn in paths.items():
            start = time.perf_counter()
            fn(text)
            seconds[name].append(time.perf_counter() - start)
    return seconds
