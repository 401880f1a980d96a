"""`retrieval-head pseudo-queries --data DIR --out FILE`: pseudo-queries the LM writes for a corpus's passages.

One query per sampled document (greedy, few-shot: `--style question` for dialogue / QA corpora, `claim` for fact
checking), written one a line to FILE for the recipe's `data.text_files` (the teacher embeds them; the head learns
its geometry for query-like text). About 1 s a passage on 2 CPU cores with SmolLM2-135M.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("pseudo-queries", help="Write pseudo-queries for a corpus (doc2query).",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="A corpus.jsonl, or a dataset folder holding one (e.g. data/scifact_train).")
    parser.add_argument("--out", required=True, help="Text file to write (one pseudo-query a line).")
    parser.add_argument("--base", default=None, help="Causal LM id or folder (default: the embedded SmolLM2-135M).")
    parser.add_argument("--style", choices=("question", "claim"), default="question")
    parser.add_argument("--count", type=int, default=400, help="Documents to sample (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import random
    import sys
    from pathlib import Path

    from retrieval_head.io.embedded import BASE_ID, load_base
    from retrieval_head.retrieval.data import document_text, load_corpus
    from retrieval_head.training.pseudo_queries import STYLES, write_pseudo_queries

    if args.count <= 0:
        print(f"error: --count must be positive, got {args.count}", file=sys.stderr)
        return 2
    file = Path(args.data) / "corpus.jsonl" if Path(args.data).is_dir() else Path(args.data)
    try:
        corpus = load_corpus(file)
    except (OSError, ValueError) as err:
        print(f"error: {file}: cannot read the corpus ({err})", file=sys.stderr)
        return 2
    ids = sorted(corpus)
    random.Random(args.seed).shuffle(ids)
    texts = [document_text(corpus[d]) for d in ids[: args.count]]
    try:
        model, tokenizer = load_base(args.base or BASE_ID)
    except (OSError, ValueError) as err:
        print(f"error: cannot load the LM {args.base or BASE_ID!r}: {err}", file=sys.stderr)
        return 2
    model.eval()
    queries = write_pseudo_queries(model, tokenizer, texts, STYLES[args.style], batch_size=args.batch_size,
                                   show_progress_bar=not args.quiet)
    kept = [q for q in queries if q]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{q}\n" for q in kept), encoding="utf-8")
    print(f"wrote {len(kept)} pseudo-queries ({len(texts) - len(kept)} passages gave none of a query's length) "
          f"to {out}")
    return 0
