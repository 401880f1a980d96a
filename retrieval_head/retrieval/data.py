"""Retrieval data: load and validate a dataset folder, build conversational inputs, split without leaks.

A folder holds `corpus.jsonl` ({id, title, text}), `queries.jsonl` ({id, text, history[, history_speakers]})
and `qrels.tsv` (query_id, doc_id, relevance; no header, or a BEIR-style header line).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from retrieval_head.core.errors import RetrievalHeadError

REQUIRED_FILES = ("corpus.jsonl", "queries.jsonl", "qrels.tsv")
SPEAKER_ROLES = {
    "U": "user",
    "USER": "user",
    "S": "assistant",
    "SYSTEM": "assistant",
    "A": "assistant",
    "ASSISTANT": "assistant",
}
SplitBy = Literal["auto", "conversation", "document"]


class DataFormatError(RetrievalHeadError, ValueError):
    """A dataset file is missing, empty or malformed; the message names the file (and line)."""


@dataclass(frozen=True)
class Query:
    """One query: the current question plus the dialogue turns before it (oldest first)."""

    id: str
    text: str
    history: tuple[str, ...] = ()
    history_speakers: tuple[str, ...] | None = None

    def roles(self) -> list[str]:
        """Chat role of each history turn: from `history_speakers` when given, else alternating so the
        turn right before the question is the assistant's."""
        if self.history_speakers is not None:
            return [SPEAKER_ROLES.get(s.upper(), "user") for s in self.history_speakers]
        n = len(self.history)
        return ["assistant" if (n - i) % 2 == 1 else "user" for i in range(n)]

    def as_messages(self, system: str | None = None) -> list[dict[str, str]]:
        """Chat messages (history, then the question as the last user message); consecutive turns of the
        same role are merged with a newline so templates that demand alternation accept them."""
        messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        for role, content in [*zip(self.roles(), self.history, strict=True), ("user", self.text)]:
            if messages and messages[-1]["role"] == role:
                messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n" + content}
            else:
                messages.append({"role": role, "content": content})
        return messages

    def flat_text(self, max_words: int | None = None) -> str:
        """History + question joined with spaces; with `max_words`, the oldest words are dropped first."""
        words = " ".join([*self.history, self.text]).split()
        if max_words is not None:
            if max_words <= 0:
                raise ValueError(f"max_words must be positive, got {max_words}")
            words = words[-max_words:]
        return " ".join(words)

    def to_dict(self) -> dict[str, Any]:
        """The queries.jsonl record of this query."""
        record: dict[str, Any] = {"id": self.id, "text": self.text, "history": list(self.history)}
        if self.history_speakers is not None:
            record["history_speakers"] = list(self.history_speakers)
        return record


class DatasetSplits(NamedTuple):
    """Train/dev/test views of one dataset; they share the corpus dict."""

    train: RetrievalDataset
    dev: RetrievalDataset
    test: RetrievalDataset


@dataclass
class RetrievalDataset:
    """Corpus (id -> {title, text}), queries (in file order) and qrels (query id -> {doc id: relevance})."""

    corpus: dict[str, dict[str, str]]
    queries: list[Query]
    qrels: dict[str, dict[str, int]]
    name: str = ""
    _by_id: dict[str, Query] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_id = {q.id: q for q in self.queries}

    def __len__(self) -> int:
        return len(self.queries)

    def __iter__(self) -> Iterator[Query]:
        return iter(self.queries)

    def __repr__(self) -> str:
        return f"RetrievalDataset(name={self.name!r}, queries={len(self.queries)}, docs={len(self.corpus)})"

    @property
    def query_ids(self) -> list[str]:
        """Query ids in order."""
        return [q.id for q in self.queries]

    @property
    def doc_ids(self) -> list[str]:
        """Document ids in corpus order."""
        return list(self.corpus)

    @property
    def is_conversational(self) -> bool:
        """True when any query carries dialogue history."""
        return any(q.history for q in self.queries)

    def query(self, query_id: str) -> Query:
        """The query with this id (KeyError naming it otherwise)."""
        try:
            return self._by_id[query_id]
        except KeyError:
            raise KeyError(f"no query {query_id!r} in {self!r}") from None

    def document_text(self, doc_id: str) -> str:
        """Title + " " + text, stripped (the form the reference numbers were measured with)."""
        return document_text(self.corpus[doc_id])

    def document_texts(self, doc_ids: Sequence[str] | None = None) -> list[str]:
        """`document_text` of each id (all documents, in corpus order, by default)."""
        return [self.document_text(d) for d in (self.doc_ids if doc_ids is None else doc_ids)]

    def relevant_docs(self) -> dict[str, set[str]]:
        """Query id -> set of doc ids with relevance > 0, for this dataset's queries that have any."""
        out = {}
        for q in self.queries:
            rel = {d for d, r in self.qrels.get(q.id, {}).items() if r > 0}
            if rel:
                out[q.id] = rel
        return out

    def subset(self, query_ids: Sequence[str], name: str | None = None) -> RetrievalDataset:
        """A view with only these queries (in dataset order) and their qrels; the corpus is shared."""
        keep = set(query_ids)
        unknown = keep - set(self._by_id)
        if unknown:
            raise KeyError(f"unknown query ids {sorted(unknown)[:5]} for {self!r}")
        queries = [q for q in self.queries if q.id in keep]
        qrels = {q.id: dict(self.qrels[q.id]) for q in queries if q.id in self.qrels}
        return RetrievalDataset(self.corpus, queries, qrels, name=self.name if name is None else name)

    def group_keys(self, by: SplitBy = "auto") -> dict[str, str]:
        """Query id -> group id; queries of one group must stay on the same side of a split.

        "conversation": queries whose dialogues open with the same first turn (DSTC11 logs that derive from
        one dialogue share their opening turns; the first turn is the conservative key). "document": queries
        whose gold documents overlap, joined transitively, plus the conversation links for dialogue data.
        "auto": conversation for dialogue data, document otherwise.
        """
        if by == "auto":
            by = "conversation" if self.is_conversational else "document"
        if by not in ("conversation", "document"):
            raise ValueError(f"by must be 'auto', 'conversation' or 'document', got {by!r}")
        parent: dict[str, str] = {}

        def find(x: str) -> str:
            parent.setdefault(x, x)
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        def union(a: str, b: str) -> None:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)

        for q in self.queries:
            node = "q\0" + q.id
            find(node)
            if q.history:
                union(node, "h\0" + q.history[0])
            if by == "document":
                for doc_id, rel in self.qrels.get(q.id, {}).items():
                    if rel > 0:
                        union(node, "d\0" + doc_id)
        roots = {q.id: find("q\0" + q.id) for q in self.queries}
        first = {}
        for q in self.queries:  # name each group after its first query, independent of node naming
            first.setdefault(roots[q.id], q.id)
        return {qid: first[root] for qid, root in roots.items()}

    def split(
        self, dev_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0, by: SplitBy = "auto"
    ) -> DatasetSplits:
        """Deterministic train/dev/test views; no conversation (or gold-document group) crosses sides.

        Groups are shuffled with `seed`, then placed largest first into the side furthest below its target
        size, so the fractions hold closely even when a few groups are large. Raises when a side asked for
        cannot get any query (e.g. one group holding nearly every query).
        """
        if not (0 <= dev_fraction < 1 and 0 <= test_fraction < 1 and dev_fraction + test_fraction < 1):
            raise ValueError(f"need 0 <= dev, test and dev + test < 1, got {dev_fraction}, {test_fraction}")
        keys = self.group_keys(by)
        groups: dict[str, list[str]] = {}
        for q in self.queries:
            groups.setdefault(keys[q.id], []).append(q.id)
        order = list(groups)
        random.Random(seed).shuffle(order)
        order.sort(key=lambda g: -len(groups[g]))  # stable: the shuffle orders groups of equal size
        n = len(self.queries)
        targets = {
            "train": n * (1 - dev_fraction - test_fraction),
            "dev": n * dev_fraction,
            "test": n * test_fraction,
        }
        members: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
        for g in order:
            side = max((s for s in members if targets[s] > 0), key=lambda s: targets[s] - len(members[s]))
            members[side].extend(groups[g])
        for side, fraction in (("train", 1.0), ("dev", dev_fraction), ("test", test_fraction)):
            if fraction > 0 and not members[side]:
                biggest = max(len(v) for v in groups.values())
                raise ValueError(
                    f"split by {by!r} left {side} empty: {len(groups)} groups, the largest holding {biggest} "
                    f"of {n} queries; use another grouping or larger fractions"
                )
        prefix = f"{self.name}-" if self.name else ""
        return DatasetSplits(*(self.subset(members[s], name=prefix + s) for s in ("train", "dev", "test")))


def _read_jsonl(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of each non-blank line; errors name the file and line."""
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            missing = [k for k in required if k not in record]
            if missing:
                raise DataFormatError(f"{path}:{lineno}: missing field(s) {missing}")
            records.append((lineno, record))
    if not records:
        raise DataFormatError(f"{path}: file is empty")
    return records


def _str_field(path: Path, lineno: int, record: dict[str, Any], key: str) -> str:
    value = record.get(key, "")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(f"{path}:{lineno}: field {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def _str_list(path: Path, lineno: int, record: dict[str, Any], key: str) -> tuple[str, ...]:
    value = record.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataFormatError(f"{path}:{lineno}: field {key!r} must be a list of strings")
    return tuple(value)


def document_text(doc: dict[str, str]) -> str:
    """A corpus record as one text: title + " " + text, stripped."""
    return (doc.get("title", "") + " " + doc.get("text", "")).strip()


def load_corpus(path: str | Path) -> dict[str, dict[str, str]]:
    """A corpus.jsonl file alone (id, text, optional title per line): doc id -> {"title", "text"}."""
    path = Path(path)
    corpus: dict[str, dict[str, str]] = {}
    for lineno, rec in _read_jsonl(path, ("id", "text")):
        doc_id = _str_field(path, lineno, rec, "id")
        if doc_id in corpus:
            raise DataFormatError(f"{path}:{lineno}: duplicate document id {doc_id!r}")
        corpus[doc_id] = {
            "title": _str_field(path, lineno, rec, "title"),
            "text": _str_field(path, lineno, rec, "text"),
        }
    return corpus


def _load_queries(path: Path) -> list[Query]:
    queries: list[Query] = []
    seen: set[str] = set()
    for lineno, rec in _read_jsonl(path, ("id", "text")):
        qid = _str_field(path, lineno, rec, "id")
        if qid in seen:
            raise DataFormatError(f"{path}:{lineno}: duplicate query id {qid!r}")
        seen.add(qid)
        history = _str_list(path, lineno, rec, "history")
        speakers = _str_list(path, lineno, rec, "history_speakers") if "history_speakers" in rec else None
        if speakers is not None and len(speakers) != len(history):
            raise DataFormatError(
                f"{path}:{lineno}: history_speakers has {len(speakers)} entries, history {len(history)}"
            )
        queries.append(Query(qid, _str_field(path, lineno, rec, "text"), history, speakers))
    return queries


def _load_qrels(path: Path, corpus: dict[str, Any], query_ids: set[str]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise DataFormatError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(parts)}")
            qid, doc_id, rel_text = (p.strip() for p in parts)
            try:
                rel = int(rel_text)
            except ValueError:
                if not qrels and lineno == 1:  # BEIR-style header "query-id corpus-id score"
                    continue
                raise DataFormatError(f"{path}:{lineno}: relevance {rel_text!r} is not an integer") from None
            if qid not in query_ids:
                raise DataFormatError(f"{path}:{lineno}: query id {qid!r} is not in queries.jsonl")
            if doc_id not in corpus:
                raise DataFormatError(f"{path}:{lineno}: document id {doc_id!r} is not in corpus.jsonl")
            qrels.setdefault(qid, {})[doc_id] = rel
    if not qrels:
        raise DataFormatError(f"{path}: file is empty")
    return qrels


def load_dataset_folder(path: str | Path, name: str | None = None) -> RetrievalDataset:
    """Load and validate a dataset folder (see the module docstring); errors name file and line."""
    folder = Path(path)
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (need {', '.join(REQUIRED_FILES)})")
    corpus = load_corpus(folder / "corpus.jsonl")
    queries = _load_queries(folder / "queries.jsonl")
    qrels = _load_qrels(folder / "qrels.tsv", corpus, {q.id for q in queries})
    return RetrievalDataset(corpus, queries, qrels, name=folder.name if name is None else name)
