"""Teacher embeddings (documents and queries), computed once per teacher + texts and kept in a `TensorCache`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

import torch

from retrieval_head.io.tensor_cache import TensorCache, cache_key
from retrieval_head.retrieval.data import Query
from retrieval_head.retrieval.fingerprint import TeacherFingerprint

Kind = Literal["query", "document"]


def teacher_embeddings(
    teacher: Any,
    texts: Sequence[str],
    cache: TensorCache | None,
    fingerprint: TeacherFingerprint,
    kind: Kind = "query",
    batch_size: int = 64,
    show_progress_bar: bool = True,
) -> torch.Tensor:
    """[N, D] float32 teacher embeddings of `texts` (`encode_query` / `encode_document`), cached by content.

    The key holds the teacher's fingerprint (so another teacher, or the same name with other weights, never
    reuses them), the kind (its prompt), and a hash of the texts.
    """
    texts = list(texts)

    def compute() -> dict[str, torch.Tensor]:
        if not texts:
            return {"embeddings": torch.empty((0, fingerprint.dim))}
        encode = getattr(teacher, f"encode_{kind}", None) or teacher.encode
        return {"embeddings": encode_by_length(teacher, encode, texts, batch_size, show_progress_bar)}

    if cache is None:
        return compute()["embeddings"]
    key = cache_key(teacher=fingerprint.to_dict(), kind=kind,
                    texts=hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest())
    meta = {"teacher": fingerprint.describe(), "kind": kind, "texts": len(texts)}
    return cache.get_or_compute(f"teacher-{kind}", key, compute, meta=meta)["embeddings"]


MAX_BATCH_TOKENS = 4096
"""Padded tokens per teacher forward at most (a batch of long documents gets fewer texts)."""


def encode_by_length(teacher: Any, encode: Any, texts: list[str], batch_size: int,
                     show_progress_bar: bool = False) -> torch.Tensor:
    """[N, D] float32 `encode(texts)` (a method of `teacher`) in batches of texts of the same token count (at most
    `batch_size` texts and `MAX_BATCH_TOKENS` padded tokens each), in the texts' order.

    sentence-transformers sorts by characters, and a batch is padded to its longest text in tokens: on short
    strings of uneven tokenisation (a vocabulary's token strings) that is 2-7x the work. The vectors are the same
    (mean pooling ignores padding)."""
    lengths = token_counts(teacher, texts)
    if lengths is None:
        return encode(texts, batch_size=batch_size, convert_to_tensor=True,
                      show_progress_bar=show_progress_bar).detach().float().cpu()
    from tqdm.auto import tqdm

    order = sorted(range(len(texts)), key=lengths.__getitem__)
    out = torch.empty(0)
    done = 0
    with tqdm(total=len(texts), desc="Teacher", disable=not show_progress_bar) as bar:
        while done < len(order):
            longest = lengths[order[min(done + batch_size, len(order)) - 1]] + 2
            size = max(1, min(batch_size, MAX_BATCH_TOKENS // longest))
            rows = order[done : done + size]
            vectors = encode([texts[i] for i in rows], batch_size=len(rows), convert_to_tensor=True,
                             show_progress_bar=False).detach().float().cpu()
            if out.numel() == 0:
                out = torch.empty((len(texts), vectors.shape[1]))
            out[rows] = vectors
            done += len(rows)
            bar.update(len(rows))
    return out


def token_counts(teacher: Any, texts: list[str], chunk: int = 8192) -> list[int] | None:
    """Each text's token count as the teacher reads it (cut to its window), tokenized a chunk at a time (only the
    counts are kept); None when the teacher has no text tokenizer to ask."""
    tokenizer = getattr(teacher, "tokenizer", None)
    window = teacher_max_tokens(teacher)
    counts: list[int] = []
    try:
        for i in range(0, len(texts), chunk):
            ids = tokenizer(texts[i : i + chunk], add_special_tokens=False, truncation=True, max_length=window,
                            return_attention_mask=False, verbose=False)["input_ids"]
            counts += [len(row) for row in ids]
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    return counts


def teacher_max_tokens(teacher: Any, override: int | None = None) -> int:
    """Tokens the teacher reads per text (its `max_seq_length`, unless the recipe overrides it)."""
    if override is not None:
        return int(override)
    value = getattr(teacher, "max_seq_length", None) or getattr(getattr(teacher, "tokenizer", None),
                                                                 "model_max_length", 512)
    return int(min(value, 8192))


def fit_left(text: str, tokenizer: Any, max_tokens: int) -> str:
    """`text` with its oldest words dropped until the teacher's tokenizer gives at most `max_tokens` tokens
    (special tokens included): history is cut from the left, never the question at the end."""
    budget = max(1, max_tokens - tokenizer.num_special_tokens_to_add(pair=False)) if hasattr(
        tokenizer, "num_special_tokens_to_add") else max_tokens
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if len(ids) <= budget:
        return text
    cut = offsets[len(ids) - budget][0]
    if cut > 0 and not text[cut - 1].isspace():  # start at the next whole word
        next_space = text.find(" ", cut)
        cut = next_space + 1 if next_space >= 0 else cut
    return text[cut:].lstrip()


def teacher_query_text(query: Query, tokenizer: Any, max_tokens: int) -> str:
    """What the teacher embeds for a query: the question alone, or history + question joined with spaces and
    cut from the left to fit the teacher (joining and truncating the END would drop the question)."""
    if not query.history:
        return query.text
    return fit_left(query.flat_text(), tokenizer, max_tokens)


def teacher_top_k(queries: torch.Tensor, documents: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """[N, min(k, D)] indices of each query's top-k documents by cosine, best first."""
    k = min(k, documents.shape[0])
    docs = torch.nn.functional.normalize(documents.float(), dim=-1)
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = torch.nn.functional.normalize(queries[start : start + chunk].float(), dim=-1)
        out.append((q @ docs.T).topk(k, dim=1).indices)
    return torch.cat(out) if out else torch.empty((0, k), dtype=torch.long)
