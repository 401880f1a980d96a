"""`retrieval-head chat`: a small retrieval-augmented conversation with native query embedding.

Each turn the agent LM writes a search query, the head embeds it from the hidden states generation already
computed, the index returns passages, and the LM answers with them. Messages come from `--message` (one or
more turns), else from stdin (one turn per line), else interactively.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from retrieval_head.core.quantization import QUANTIZE_TO


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
    parser.add_argument("--search-with", choices=("query", "user_turn"), default="user_turn",
                        help="embedding that searches: the user's last message read from the same generation's "
                             "prefill (default; what a head trained on dialogues reads best), or the query the LM "
                             "writes")
    parser.add_argument("--quantize-head-to", choices=QUANTIZE_TO, default=None,
                        help="run the head with float16 or int8 weights on the CPU (2x / 4x fewer bytes per query)")
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
    from retrieval_head.agent import EmptyQuerySpanError, NativeRetriever
    from retrieval_head.core.model import RetrievalModel

    model = RetrievalModel.from_pretrained(args.head, quantize_head_to=args.quantize_head_to)
    corpus = _read_corpus(Path(args.data)) if args.data else None
    index = _load_index(args, model, corpus)
    agent = NativeRetriever(model, index, check_teacher=not args.no_check_teacher, search_with=args.search_with)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    cache = None
    for message in _messages(args):
        conversation = [*history, {"role": "user", "content": message}]
        try:
            result = agent.generate_and_search(conversation, k=args.k, max_new_tokens=args.max_query_tokens,
                                               cache=cache)
        except EmptyQuerySpanError as err:
            print(f"error: {err}", file=sys.stderr)
            continue
        docs = [corpus.get(h.doc_id, {}) if corpus else {} for h in result.hits]
        passages = [(d.get("title", "") + ": " + d.get("text", "")).strip(": ") or h.doc_id
                    for d, h in zip(docs, result.hits, strict=True)]
        reply, cache = agent.answer(conversation, result, passages, max_new_tokens=args.max_answer_tokens)
        history = [*conversation, {"role": "assistant", "content": reply}]
        hits = [{"doc_id": h.doc_id, "score": round(h.score, 4), "title": d.get("title", "")}
                for h, d in zip(result.hits, docs, strict=True)]
        if args.json:
            print(json.dumps({"message": message, "query": result.query_text, "searched_with": result.searched_with,
                              "used_markers": result.used_markers,
                              "note": result.note, "hits": hits, "answer": reply,
                              "timings_ms": {k: round(v * 1000, 2) for k, v in result.timings.items()
                                             if k.endswith("_s")}}))
        else:
            print(f"query: {result.query_text!r}" + ("" if result.used_markers else f"  ({result.note})")
                  + ("  [searched with the user's message]" if result.searched_with == "user_turn" else ""))
            for rank, (hit, passage) in enumerate(zip(hits, passages, strict=True), 1):
                print(f"  [{rank}] {hit['doc_id']} {hit['score']:.3f}  {passage[:100]}")
            print(f"assistant: {reply}")
    return 0
