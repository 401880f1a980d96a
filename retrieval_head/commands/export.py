"""`retrieval-head export HEAD OUT`: write HEAD as a standalone sentence-transformers folder (built-in modules
only, the base cut to the head's layer), which `SentenceTransformer(OUT)` loads with no `trust_remote_code`.
The folder is checked against the head's own vectors before it is written."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("export", help="Write a head as a standalone sentence-transformers folder.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("head", help="Head folder or Hub repo id.")
    parser.add_argument("output", help="Folder to write (new or empty, unless --overwrite).")
    parser.add_argument("--revision", help="Hub revision of the head.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty OUTPUT folder.")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Then upload OUTPUT to this Hub repo.")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from retrieval_head.core.config import HeadFolderError
    from retrieval_head.core.model import RetrievalModel
    from retrieval_head.io.export import ExportError, export_sentence_transformer, push_export

    try:
        model = RetrievalModel.from_pretrained(args.head, revision=args.revision, quantize_head_to=None)  # fp32
        result = export_sentence_transformer(model, args.output, overwrite=args.overwrite)
    except (ExportError, HeadFolderError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {result['path']}: base cut to {result['layers']} layers; SentenceTransformer({result['path']!r}) "
          f"gives the head's vectors (max abs diff {result['max_abs_diff']:.1e} on the check texts)")
    if args.push_to_hub:
        commit = push_export(args.output, args.push_to_hub, private=args.private or None)
        print(f"pushed to {args.push_to_hub}: {commit}")
    return 0
