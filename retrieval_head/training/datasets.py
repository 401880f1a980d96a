"""Training examples: LM features (cached), teacher query embeddings and teacher top-k documents, per source.

A *source* is one bundled dataset (its queries, split train/dev/test by conversation or gold document), the
corpus sentences of a dataset used as extra label-free texts, or a plain text file. Every example has

- the head's weight-free input (pooled features of one layer, or the span tokens of one layer),
- the teacher's embedding of the same query (conversations: history + question, cut from the left to fit
  the teacher's max length) -- the alignment and label-free contrastive target,
- the teacher's top-k documents of its dataset's corpus (indices into one matrix of every corpus) -- the
  rank-distillation candidates; -1 where the example has no corpus,
- its gold documents (only used when the recipe turns on gold contrastive positives = domain adaptation).

LM inputs are rendered exactly as at inference: `query.as_messages()` for a query with history, the text
otherwise. `retrieval-head cache --recipe R.yaml` fills the same cache entries ahead of training.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retrieval_head.io.tensor_cache import TensorCache
from retrieval_head.retrieval.data import Query, RetrievalDataset, load_dataset_folder
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.retrieval.teacher import teacher_embeddings, teacher_max_tokens, teacher_query_text, teacher_top_k
from retrieval_head.training.features import (
    SHARD_SIZE,
    build_features,
    cached_features,
    feature_key,
    shard_names,
    with_static_ids,
)
from retrieval_head.training.recipe import Recipe, RecipeError

logger = logging.getLogger(__name__)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def lm_input(query: Any) -> Any:
    """The LM input of a query: its chat messages when it has history, else its text (as at inference)."""
    return query.as_messages() if query.history else query.text


def resolve_data_path(root: str, name: str) -> Path:
    """`root/name`, looked up from the working directory, then from the repository that holds this package."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = base / root / name
        if path.exists():
            return path
    return Path(root) / name


@dataclass
class Source:
    """One source of examples; every tensor's rows align with `items`."""

    name: str
    kind: str  # "queries" | "dialogues" | "corpus" | "texts"
    items: list[Any]
    features: dict[str, torch.Tensor]
    teacher: torch.Tensor
    top_k: torch.Tensor  # [N, k] indices into TrainingData.documents, -1 = none
    gold: list[list[int]]  # indices into TrainingData.documents
    splits: dict[str, list[int]]  # "train" / "dev" / "test" -> rows
    dataset: RetrievalDataset | None = None
    query_ids: list[str] | None = None
    doc_range: tuple[int, int] | None = None  # this dataset's rows in TrainingData.documents
    evaluate: bool = False


@dataclass
class TrainingData:
    """Every source, plus one matrix of teacher document embeddings of every corpus."""

    sources: list[Source]
    documents: torch.Tensor
    doc_ids: list[str]
    fingerprint: TeacherFingerprint
    hidden_size: int
    feature_keys: list[str] = field(default_factory=list)

    def eval_sources(self) -> list[Source]:
        return [s for s in self.sources if s.evaluate]

    def groups(self, split: str) -> list[int]:
        """A dataset id per row of `examples(split)`: a dataset's queries and its corpus texts share one
        ("<dataset>" and "<dataset>:corpus"), every other source has its own."""
        names: dict[str, int] = {}
        out: list[int] = []
        for s in self.sources:
            rows = s.splits.get(split)
            if rows:
                out += [names.setdefault(s.name.split(":")[0], len(names))] * len(rows)
        return out

    def examples(self, split: str, key: str, token_level: bool = False) -> ExampleSet:
        """The `split` rows of every source (train: queries + extra texts; dev/test: queries) as one set."""
        parts = [s for s in self.sources if s.splits.get(split)]
        if not parts:
            raise ValueError(f"no {split} examples in {[s.name for s in self.sources]}")
        return ExampleSet.concat([ExampleSet.from_source(s, s.splits[split], key, token_level) for s in parts])


@dataclass
class ExampleSet:
    """Aligned example tensors; `offsets` is set for token-level features ([T, H] span tokens)."""

    features: torch.Tensor
    teacher: torch.Tensor
    top_k: torch.Tensor
    gold: torch.Tensor  # [N, G] doc indices, -1 padded
    offsets: torch.Tensor | None = None
    ids: torch.Tensor | None = None  # every row's span token ids, concatenated (a static branch reads them)
    id_offsets: torch.Tensor | None = None  # [N + 1] where each row's ids start in `ids`

    def __len__(self) -> int:
        return self.teacher.shape[0]

    @classmethod
    def from_source(cls, source: Source, rows: Sequence[int], key: str, token_level: bool) -> ExampleSet:
        if key not in source.features:
            raise KeyError(f"{source.name}: no cached feature {key!r}; have {sorted(source.features)}")
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        offsets = None
        if token_level:
            all_offsets = source.features["token_offsets"]
            tokens = source.features[key]
            pieces = [tokens[all_offsets[i] : all_offsets[i + 1]] for i in idx.tolist()]
            lengths = torch.tensor([p.shape[0] for p in pieces], dtype=torch.long)
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            features = torch.cat(pieces) if pieces else tokens[:0]
        else:
            features = source.features[key][idx]
        gold = [source.gold[i] for i in idx.tolist()]
        width = max([len(g) for g in gold] + [1])
        gold_t = torch.full((len(gold), width), -1, dtype=torch.long)
        for r, g in enumerate(gold):
            gold_t[r, : len(g)] = torch.tensor(g, dtype=torch.long)
        ids = id_offsets = None
        if "span_ids" in source.features:
            all_ids, starts = source.features["span_ids"], source.features["span_offsets"]
            pieces = [all_ids[starts[i] : starts[i + 1]] for i in idx.tolist()]
            ids = torch.cat(pieces) if pieces else all_ids[:0]
            id_offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                                    torch.tensor([p.shape[0] for p in pieces], dtype=torch.long).cumsum(0)])
        return cls(features, source.teacher[idx], source.top_k[idx], gold_t, offsets, ids, id_offsets)

    @classmethod
    def concat(cls, parts: Sequence[ExampleSet]) -> ExampleSet:
        k = max(p.top_k.shape[1] for p in parts)
        g = max(p.gold.shape[1] for p in parts)

        def pad(t: torch.Tensor, width: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)

        def joined(name: str) -> torch.Tensor | None:
            if any(getattr(p, name) is None for p in parts):
                return None
            chunks, start = [torch.zeros(1, dtype=torch.long)], 0
            for p in parts:
                chunks.append(getattr(p, name)[1:] + start)
                start += int(getattr(p, name)[-1])
            return torch.cat(chunks)

        id_offsets = joined("id_offsets")
        ids = torch.cat([p.ids for p in parts]) if id_offsets is not None else None
        return cls(torch.cat([p.features for p in parts]), torch.cat([p.teacher for p in parts]),
                   torch.cat([pad(p.top_k, k) for p in parts]), torch.cat([pad(p.gold, g) for p in parts]),
                   joined("offsets"), ids, id_offsets)

    def head_input(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, mask) of these rows: pooled [B, H] (mask None), or tokens padded to [B, L, H] + mask."""
        idx = list(rows)
        if self.offsets is None:
            return self.features[idx].float(), None
        pieces = [self.features[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        length = max(max(p.shape[0] for p in pieces), 1)
        out = torch.zeros((len(idx), length, self.features.shape[1]))
        mask = torch.zeros((len(idx), length), dtype=torch.bool)
        for r, p in enumerate(pieces):
            out[r, : p.shape[0]] = p.float()
            mask[r, : p.shape[0]] = True
        return out, mask

    def span_ids(self, rows: Sequence[int]) -> torch.Tensor | None:
        """The rows' span token ids padded with -1 ([B, L]), or None when the features carry none."""
        if self.ids is None or self.id_offsets is None:
            return None
        pieces = [self.ids[self.id_offsets[i] : self.id_offsets[i + 1]] for i in rows]
        out = torch.full((len(pieces), max([p.shape[0] for p in pieces] + [1])), -1, dtype=torch.long)
        for r, p in enumerate(pieces):
            out[r, : p.shape[0]] = p.long()
        return out

    def batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """A training batch: head input (+ span ids), teacher targets, top-k and gold doc indices."""
        features, mask = self.head_input(rows)
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        batch = {"features": features, "teacher": self.teacher[idx].float(), "top_k": self.top_k[idx],
                 "gold": self.gold[idx], "rows": idx}
        if mask is not None:
            batch["mask"] = mask
        span_ids = self.span_ids(idx.tolist())
        if span_ids is not None:
            batch["span_ids"] = span_ids
        return batch


def sub_dialogues(queries: Sequence[Query], exclude: Sequence[Query] = ()) -> list[Query]:
    """Every earlier user turn of these dialogues as a query of its own, with the turns before it as history.

    Label-free conversational queries (the teacher embeds them like any query): a dialogue of n user turns
    gives n - 1. Repeats (dialogues that share a prefix) and any query of `exclude` (the dev and test splits)
    are left out, so no held-out query is trained on.
    """
    seen = {(q.history, q.text) for q in exclude}
    out = []
    for q in queries:
        for i, role in enumerate(q.roles()):
            if role != "user":
                continue
            sub = Query(f"{q.id}#turn{i}", q.history[i], q.history[:i],
                        None if q.history_speakers is None else q.history_speakers[:i])
            if (sub.history, sub.text) not in seen:
                seen.add((sub.history, sub.text))
                out.append(sub)
    return out


def _sample(rows: list[int], cap: int | None, seed: int) -> list[int]:
    if cap is None or len(rows) <= cap:
        return rows
    return sorted(random.Random(seed).sample(rows, cap))


def corpus_sentences(dataset: RetrievalDataset, count: int | None, seed: int, min_words: int = 5,
                     max_words: int = 60) -> list[str]:
    """`count` sentences (5-60 words; None = all) of the corpus, shuffled: label-free alignment texts in the domain.

    The order is one seeded shuffle, so a smaller count is a prefix of a larger one (and reuses its cache shards).
    """
    sentences = []
    for doc_id in dataset.doc_ids:
        doc = dataset.corpus[doc_id]
        for text in (doc.get("title", ""), *_SENTENCE.split(doc.get("text", ""))):
            n = len(text.split())
            if min_words <= n <= max_words:
                sentences.append(text.strip())
    sentences = sorted(set(sentences))
    random.Random(seed).shuffle(sentences)
    return sentences if count is None else sentences[:count]


MAX_LINE_CHARS = 20_000  # one training text per line; a longer line is a file in another format


def read_text_file(file: Path, max_chars: int = MAX_LINE_CHARS) -> list[str]:
    """The non-blank lines of a UTF-8 text file, one training text each; errors name the file and line."""
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise ValueError(f"{file}: cannot read the text file ({err.strerror})") from err
    texts = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}, line {number}: not UTF-8 (byte {err.start}); save the file as UTF-8") from None
        if len(text) > max_chars:
            raise ValueError(f"{file}, line {number}: {len(text):,} characters in one line (at most {max_chars:,}); "
                             "give one training text per line")
        if text:
            texts.append(text)
    if not texts:
        raise ValueError(f"{file}: no training text (the file is empty); give one training text per line")
    return texts


def oversample(sources: list[Source], counts: dict[str, int]) -> None:
    """Repeat the train rows of the named sources `counts[name]` times (an epoch then sees them that often)."""
    names = {s.name for s in sources}
    unknown = sorted(set(counts) - names)
    if unknown:
        raise RecipeError(f"data.oversample names {unknown}, which are not sources of this recipe; its sources are "
                          f"{sorted(names)}")
    for source in sources:
        if counts.get(source.name, 1) > 1:
            source.splits["train"] = source.splits.get("train", []) * counts[source.name]


@dataclass
class SourcePlan:
    """One source's texts and splits, before anything is computed: what `build_training_data` embeds and
    `prefill_features` extracts."""

    name: str
    kind: str  # "queries" | "dialogues" | "corpus" | "texts"
    items: list[Any]  # the LM inputs
    splits: dict[str, list[int]]
    queries: list[Query] | None = None  # queries / dialogues: the teacher embeds their text, not `items`
    dataset: RetrievalDataset | None = None  # whose corpus ranks the teacher's top-k (None: a text file)
    evaluate: bool = False


def plan_sources(recipe: Recipe) -> list[SourcePlan]:
    """Load, split and sample the recipe's data into sources (no model runs)."""
    d = recipe.data
    plans: list[SourcePlan] = []
    for position, name in enumerate(d.datasets):
        dataset = load_dataset_folder(resolve_data_path(d.root, name))
        split = dataset.split(d.dev_fraction, d.test_fraction, seed=d.split_seed)
        evaluate = name in d.eval_datasets
        row_of = {q.id: i for i, q in enumerate(dataset.queries)}
        seed = d.sample_seed + position
        chosen = {"train": _sample([row_of[q.id] for q in split.train], d.max_train_queries, seed)}
        for side, cap in (("dev", d.max_dev_queries), ("test", d.max_test_queries)):
            rows = [row_of[q.id] for q in getattr(split, side)] if evaluate else []
            chosen[side] = _sample(rows, cap, seed + 17)
        sampled = any(cap is not None for cap in (d.max_train_queries, d.max_dev_queries, d.max_test_queries))
        keep = sorted(set().union(*chosen.values())) if sampled else list(range(len(dataset.queries)))
        local = {row: i for i, row in enumerate(keep)}
        queries = [dataset.queries[i] for i in keep]
        logger.info("%s: %d queries (train %d, dev %d, test %d)", name, len(queries),
                    *(len(chosen[s]) for s in ("train", "dev", "test")))
        plans.append(SourcePlan(name, "queries", [lm_input(q) for q in queries],
                                {s: [local[r] for r in rows] for s, rows in chosen.items()}, queries, dataset,
                                evaluate))
        if d.sub_dialogues:
            subs = sub_dialogues([dataset.queries[r] for r in chosen["train"]], [*split.dev, *split.test])
            if subs:
                plans.append(SourcePlan(f"{name}:dialogues", "dialogues", [lm_input(q) for q in subs],
                                        {"train": list(range(len(subs)))}, subs, dataset))
        if d.corpus_texts is None or d.corpus_texts > 0:
            texts = corpus_sentences(dataset, d.corpus_texts, seed)
            plans.append(SourcePlan(f"{name}:corpus", "corpus", texts, {"train": list(range(len(texts)))},
                                    dataset=dataset))
    for path in d.text_files:
        texts = read_text_file(Path(path))
        plans.append(SourcePlan(Path(path).name, "texts", texts, {"train": list(range(len(texts)))}))
    return plans


def prefill_features(recipe: Recipe, model: Any, cache: TensorCache, rank: int, world_size: int,
                     show_progress_bar: bool = True) -> None:
    """This rank's share of every source's LM feature shards: the shards of all sources are numbered in turn and
    rank `r` of `world_size` builds shards `r`, `r + world_size`, ... Under `accelerate launch` each process runs
    it, then waits for the others: `build_training_data` afterwards finds every shard built."""
    f, first = recipe.features, 0
    for plan in plan_sources(recipe):
        build_features(model, plan.items, cache, f.layers, f.poolings, f.token_layer, batch_size=f.batch_size,
                       show_progress_bar=show_progress_bar, rank=rank, world_size=world_size, first_shard=first)
        first += len(shard_names(plan.items, SHARD_SIZE))


def build_training_data(
    recipe: Recipe,
    model: Any,
    teacher: Any,
    fingerprint: TeacherFingerprint,
    cache: TensorCache,
    show_progress_bar: bool = True,
) -> TrainingData:
    """Load, split and sample the recipe's data (`plan_sources`), then fill (or reuse) every cache: LM features,
    teacher document and query embeddings. `model` is the RetrievalModel whose base reads the texts."""
    d, f = recipe.data, recipe.features
    tokenizer = teacher.tokenizer
    max_tokens = teacher_max_tokens(teacher, recipe.teacher.max_tokens)
    documents: list[torch.Tensor] = []
    doc_ids: list[str] = []
    corpora: dict[int, tuple[torch.Tensor, int, dict[str, int]]] = {}  # id(dataset) -> embeddings, start, row of
    sources: list[Source] = []

    def teacher_of(texts: list[str], kind: str = "query") -> torch.Tensor:
        return teacher_embeddings(teacher, texts, cache, fingerprint, kind, recipe.teacher.batch_size,
                                  show_progress_bar)

    def corpus_of(dataset: RetrievalDataset) -> tuple[torch.Tensor, int, dict[str, int]]:
        if id(dataset) not in corpora:
            start = len(doc_ids)
            documents.append(teacher_of(dataset.document_texts(), "document"))
            doc_ids.extend(dataset.doc_ids)
            corpora[id(dataset)] = documents[-1], start, {doc: start + i for i, doc in enumerate(dataset.doc_ids)}
        return corpora[id(dataset)]

    for plan in plan_sources(recipe):
        texts = plan.items if plan.queries is None else [teacher_query_text(q, tokenizer, max_tokens)
                                                          for q in plan.queries]
        corpus = corpus_of(plan.dataset) if plan.dataset is not None else None
        emb = teacher_of(texts)
        if corpus is None:
            top_k = torch.full((len(texts), 1), -1, dtype=torch.long)
        else:
            top_k = teacher_top_k(emb, corpus[0], recipe.loss.top_k) + corpus[1]
        features = with_static_ids(model, plan.items, cached_features(
            model, plan.items, cache, f.layers, poolings=f.poolings, token_layer=f.token_layer,
            batch_size=f.batch_size, show_progress_bar=show_progress_bar))
        queries = plan.queries if plan.kind == "queries" and corpus is not None else None
        gold = [[] for _ in plan.items] if queries is None else [
            [corpus[2][doc] for doc, rel in sorted(plan.dataset.qrels.get(q.id, {}).items()) if rel > 0]
            for q in queries]
        sources.append(Source(
            name=plan.name, kind=plan.kind, items=plan.items, features=features, teacher=emb, top_k=top_k,
            gold=gold, splits=plan.splits, dataset=plan.dataset if queries else None,
            query_ids=[q.id for q in queries] if queries else None,
            doc_range=(corpus[1], corpus[1] + len(plan.dataset.doc_ids)) if queries else None,
            evaluate=plan.evaluate,
        ))
    oversample(sources, d.oversample)
    docs = torch.cat(documents) if documents else torch.empty((0, fingerprint.dim))
    keys = sorted({feature_key(p, layer) for p in f.poolings for layer in f.layers})
    return TrainingData(sources, docs, doc_ids, fingerprint, int(model.config.base_hidden_size), keys)
