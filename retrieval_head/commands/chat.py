"""`retrieval-head chat`: a small retrieval-augmented conversation with native query embedding.

Default (`--mode search-first`): each turn is one prefill of the conversation; the head embeds the user's
message from its states, the index returns passages, and the answer continues the same KV cache (no query is
written, no token runs twice; the next turn reuses the cache). `--mode query`: the LM first writes a search
query, the head embeds it from generation's states, then the LM answers. Each turn prints the hits and the time
split. Messages come from `--message` (one or more turns), else from stdin (one turn per line), else
interactively.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from retrieval_head.core.quantization import QUANTIZE_TO
from retrieval_head.io.load import quantize_option


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "chat", help="retrieval-augmented chat: the LM writes a query, the head embeds it, the index answers",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--head", required=True, help="head folder or Hub repo (loads its base LM too)")
    parser.add_argument("--index", required=True,
                        help="DocumentIndex folder; built from --data with the head's teacher if it does not exist")
    parser.add_argument("--data", default=None,
                        help="dataset folder with corpus.jsonl (the passages), e.g. data/dstc11_track5_val_reviewdoc")
    parser.add_argument("--message", action="append", default=None,
                        help="a user message (repeat for several turns); without it, lines of stdin")
    parser.add_argument("-k", type=int, default=3, help="passages retrieved per turn")
    parser.add_argument("--max-query-tokens", type=int, default=32, help="generation budget for the query")
    parser.add_argument("--max-answer-tokens", type=int, default=96, help="generation budget for the answer")
    parser.add_argument("--mode", choices=("search-first", "query"), default="search-first",
                        help="search-first (default): search with the user's message from the answer's own prefill; "
                             "query: the LM writes a search query first")
    parser.add_argument("--passage-chars", type=int, default=600, help="each passage is cut to this many characters")
    parser.add_argument("--cache-passages", action="store_true",
                        help="search-first: keep each passage's keys and values once computed and reuse them in "
                             "later turns (a rotary-position LM; see retrieval_head.agent.passage_cache)")
    parser.add_argument("--search-with", choices=("query", "user_turn"), default="user_turn",
                        help="--mode query: the embedding that searches: the user's last message read from the same "
                             "generation's "
                             "prefill (default; what a head trained on dialogues reads best), or the query the LM "
                             "writes")
    parser.add_argument("--quantize-head-to", choices=("float32", *QUANTIZE_TO), default=None,
                        help="the head's weights on the CPU: float16 / int8 read 2x / 4x fewer bytes per query than "
                             "float32 (default: the head config's quantize_to)")
    parser.add_argument("--system", default=None, help="system message of the conversation")
    parser.add_argument("--no-check-teacher", action="store_true",
                        help="skip the check that the index was built by the head's teacher")
    parser.add_argument("--json", action="store_true", help="print one JSON object per turn")
    parser.set_defaults(run=run)


def _read_corpus(folder: Path) -> dict[str, dict[str, str]]:
    path = folder / "corpus.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; --data must be a dataset folder with corpus.jsonl")
    corpus = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                corpus[str(record["id"])] = {"title": record.get("title", ""), "text": record.get("text", "")}
    return corpus


def _load_index(args: argparse.Namespace, model: Any, corpus: dict[str, dict[str, str]] | None) -> Any:
    from retrieval_head.retrieval.fingerprint import TeacherFingerprint
    from retrieval_head.retrieval.index import DocumentIndex

    folder = Path(args.index)
    if folder.exists():
        return DocumentIndex.load(folder)
    if corpus is None:
        raise FileNotFoundError(f"{folder} does not exist; give an index folder, or --data to build one there")
    teacher_info = model.config.teacher or {}
    if not teacher_info.get("teacher_id"):
        raise ValueError("the head records no teacher, so no index can be built for it; give --index")
    from retrieval_head.io.embedded import load_teacher_by_id

    print(f"building the index of {len(corpus)} documents with {teacher_info['teacher_id']} ...", file=sys.stderr)
    teacher = load_teacher_by_id(teacher_info["teacher_id"], teacher_info.get("revision"))
    index = DocumentIndex.build(teacher, corpus, fingerprint=TeacherFingerprint.from_dict(teacher_info))
    index.save(folder)
    return index


def _messages(args: argparse.Namespace):
    if args.message:
        yield from args.message
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


def run(args: argparse.Namespace) -> int:
    from retrieval_head.agent import NativeRetriever
    from retrieval_head.core.model import RetrievalModel

    model = RetrievalModel.from_pretrained(args.head, quantize_head_to=quantize_option(args.quantize_head_to))
    corpus = _read_corpus(Path(args.data)) if args.data else None
    index = _load_index(args, model, corpus)
    agent = NativeRetriever(model, index, check_teacher=not args.no_check_teacher, search_with=args.search_with)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    turns = _search_first if args.mode == "search-first" else _query_first
    for line in turns(args, agent, corpus, history):
        print(line)
    return 0


def _passage(corpus: dict[str, dict[str, str]] | None, doc_id: str) -> str:
    doc = (corpus or {}).get(doc_id, {})
    return (doc.get("title", "") + ": " + doc.get("text", "")).strip(": ") or doc_id


def _report(args: argparse.Namespace, message: str, hits: list[dict[str, Any]], passages: list[str], answer: str,
            timings: dict[str, float], extra: dict[str, Any]) -> str:
    split = {k: round(v * 1000, 2) for k, v in timings.items() if k.endswith("_s")}
    if args.json:
        return json.dumps({"message": message, **extra, "hits": hits, "answer": answer, "timings_ms": split})
    lines = [f"query: {extra['query']!r}" + ("" if extra.get("used_markers", True) else f"  ({extra['note']})")
             + ("  [searched with the user's message]" if extra["searched_with"] == "user_turn" else "")]
    lines += [f"  [{rank}] {hit['doc_id']} {hit['score']:.3f}  {passage[:100]}"
              for rank, (hit, passage) in enumerate(zip(hits, passages, strict=True), 1)]
    lines.append(f"assistant: {answer}")
    lines.append("  time (ms): " + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in split.items()))
    return "\n".join(lines)


def _search_first(args: argparse.Namespace, agent: Any, corpus: Any, history: list[dict[str, str]]) -> Any:
    from retrieval_head.agent import PassageCache
    from retrieval_head.agent.turn import SearchFirstAgent

    documents = {doc_id: _passage(corpus, doc_id) for doc_id in agent.index.doc_ids}
    passages = PassageCache(agent.model) if args.cache_passages else None
    first = SearchFirstAgent(agent, documents, k=args.k, passage_chars=args.passage_chars, passage_cache=passages)
    cache = None
    for message in _messages(args):
        turn = first.turn([*history, {"role": "user", "content": message}], max_new_tokens=args.max_answer_tokens,
                          cache=cache)
        history, cache = turn.history, turn.cache
        hits = [{"doc_id": h.doc_id, "score": round(h.score, 4), "title": (corpus or {}).get(h.doc_id, {}).get(
            "title", "")} for h in turn.hits]
        timings = {k: turn.timings[k] for k in ("prefill_s", "embed_s", "search_s", "first_token_s", "answer_s",
                                                 "total_s")}
        yield _report(args, message, hits, turn.passages, turn.answer, timings,
                      {"query": message, "searched_with": "user_turn", "mode": "search-first",
                       "tokens": turn.tokens, "cut_tokens": turn.cut_tokens})


def _query_first(args: argparse.Namespace, agent: Any, corpus: Any, history: list[dict[str, str]]) -> Any:
    from retrieval_head.agent import EmptyQuerySpanError

    cache = None
    for message in _messages(args):
        conversation = [*history, {"role": "user", "content": message}]
        try:
            result = agent.generate_and_search(conversation, k=args.k, max_new_tokens=args.max_query_tokens,
                                               cache=cache)
        except EmptyQuerySpanError as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        passages = [_passage(corpus, h.doc_id) for h in result.hits]
        reply, cache = agent.answer(conversation, result, passages, max_new_tokens=args.max_answer_tokens)
        history = [*conversation, {"role": "assistant", "content": reply}]
        hits = [{"doc_id": h.doc_id, "score": round(h.score, 4), "title": (corpus or {}).get(h.doc_id, {}).get(
            "title", "")} for h in result.hits]
        yield _report(args, message, hits, passages, reply, result.timings,
                      {"query": result.query_text, "searched_with": result.searched_with, "mode": "query",
                       "used_markers": result.used_markers, "note": result.note})
