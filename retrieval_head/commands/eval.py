"""`retrieval-head eval --head H --data data/<name>`: how much of the teacher's retrieval quality a head keeps.

Documents are embedded by the head's teacher (named by the fingerprint in the head's config, resolved offline
for the embedded one) into a faiss index; with `--index DIR` the index is saved there and reused next time,
and refused if another teacher built it. The teacher embeds each query as history + question (the oldest words
cut to fit its window), the head reads the dialogue as chat messages, and BM25 is the floor. Prints a table
(nDCG@10, R@1/5/10/100, MRR@10, retention per metric, top-10 agreement, the queries the head loses most on)
and writes the full report as JSON with `--output`.

`--split test` (default) evaluates the test split the head's training held out (the split recorded in its
config, else the default one); `--split all` every query.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from retrieval_head.core.quantization import QUANTIZE_TO
from retrieval_head.io.load import quantize_option


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "eval", help="Evaluate a head against its teacher (and BM25) on a dataset folder.",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--head", required=True, help="Head folder or Hub repo (its base LM is loaded too).")
    parser.add_argument("--data", required=True,
                        help="Dataset folder in the uniform format (corpus.jsonl, queries.jsonl, qrels.tsv).")
    parser.add_argument("--split", choices=("test", "all"), default="test",
                        help="Queries to evaluate: the held-out test split (default) or all of them.")
    parser.add_argument("--output", help="Write the report (JSON) to this file.")
    parser.add_argument("--index", help="DocumentIndex folder: reused if it exists (and built by the head's "
                                        "teacher), else built and saved there.")
    parser.add_argument("--embeddings", help="Teacher embedding cache folder (e.g. training's .cache/features, or the "
                                             "shipped data/teacher-embeddings): a new index reuses the documents' "
                                             "embeddings when the same teacher embedded the same texts, else "
                                             "computes them and stores them there.")
    parser.add_argument("--max-queries", type=int, default=None,
                        help="Evaluate a seeded random sample of this many queries (quick checks).")
    parser.add_argument("--batch-size", type=int, default=32, help="Encode batch size (default: %(default)s).")
    parser.add_argument("--worst", type=int, default=10, help="Worst queries listed (default: %(default)s).")
    parser.add_argument("--no-bm25", action="store_true", help="Skip the BM25 floor.")
    parser.add_argument("--quantize-head-to", choices=("float32", *QUANTIZE_TO), default=None,
                        help="Evaluate the head run with float32, float16 or int8 weights (CPU; default: the head "
                             "config's quantize_to).")
    parser.add_argument("--device", default=None, help="Torch device for the LM, head and teacher (default: cpu).")
    parser.add_argument("--progress", action="store_true", help="Show progress bars.")
    parser.set_defaults(run=run)


def sample_queries(dataset: Any, n: int | None, seed: int = 0) -> Any:
    """A seeded sample of `n` queries that have relevant documents (the dataset itself when n is None)."""
    if n is None:
        return dataset
    if n <= 0:
        raise ValueError(f"--max-queries must be positive, got {n}")
    ids = sorted(dataset.relevant_docs())
    if n >= len(ids):
        return dataset
    return dataset.subset(random.Random(seed).sample(ids, n))


def load_or_build_index(folder: str | Path | None, teacher: Any, dataset: Any, fingerprint: Any,
                        batch_size: int = 64, show_progress_bar: bool = False,
                        cache: Any = None) -> tuple[Any, str]:
    """(index, how it was obtained): loaded from `folder` (refused if another teacher built it or it lacks the
    corpus' documents), else built with the teacher (its document embeddings read from, or stored in, the
    `TensorCache` `cache` when given) and saved to `folder` when given."""
    from retrieval_head.retrieval.index import META_FILE, DocumentIndex

    if folder is not None and (Path(folder) / META_FILE).is_file():
        index = DocumentIndex.load(folder, expected_teacher=fingerprint)
        missing = set(dataset.doc_ids) - set(index.doc_ids)
        if missing:
            raise ValueError(f"the index in {folder} lacks {len(missing)} of {len(dataset.doc_ids)} documents of "
                             f"{dataset.name} (e.g. {sorted(missing)[:3]}): it was built for another corpus; "
                             "give another --index folder")
        return index, f"loaded from {folder}"
    if cache is None:
        index = DocumentIndex.build(teacher, dataset, fingerprint=fingerprint, batch_size=batch_size,
                                    show_progress_bar=show_progress_bar)
        how = "built"
    else:
        from retrieval_head.retrieval.teacher import teacher_embeddings

        fingerprint.check_matches(type(fingerprint).from_sentence_transformer(teacher), what="teacher")
        ids = list(dataset.doc_ids)
        embeddings = teacher_embeddings(teacher, dataset.document_texts(ids), cache, fingerprint, "document",
                                        batch_size, show_progress_bar)
        index = DocumentIndex.from_embeddings(embeddings.numpy(), ids, fingerprint)
        how = f"built from the embedding cache {cache.root}"
    if folder is not None:
        index.save(folder)
        return index, f"{how} and saved to {folder}"
    return index, how


def evaluate_head(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `run` does but printing: load, split, index, compare. Returns the JSON report."""
    import torch

    from retrieval_head.core.model import RetrievalModel
    from retrieval_head.evaluation.compare import check_teacher, compare_head_and_teacher, held_out, split_settings
    from retrieval_head.io.embedded import load_teacher_by_id
    from retrieval_head.io.tensor_cache import TensorCache
    from retrieval_head.retrieval.data import load_dataset_folder

    dataset = load_dataset_folder(args.data)  # first: a bad folder fails before any model loads
    model = RetrievalModel.from_pretrained(args.head, device=args.device,
                                           quantize_head_to=quantize_option(args.quantize_head_to))
    info = model.config.teacher or {}
    if not info.get("teacher_id"):
        raise ValueError(f"the head {args.head} records no teacher (config.json has no 'teacher' fingerprint), so "
                         "there is nothing to compare it against; train it with a teacher first")
    teacher = load_teacher_by_id(info["teacher_id"], info.get("revision"), device=args.device)
    fingerprint = check_teacher(model, teacher)
    evaluated = held_out(dataset, model) if args.split == "test" else dataset
    evaluated = sample_queries(evaluated, args.max_queries)
    cache = TensorCache(args.embeddings) if args.embeddings else None
    index, how = load_or_build_index(args.index, teacher, dataset, fingerprint, show_progress_bar=args.progress,
                                     cache=cache)
    with torch.inference_mode():
        report = compare_head_and_teacher(model, teacher, evaluated, index=index, fingerprint=fingerprint,
                                          bm25=not args.no_bm25, worst=args.worst, batch_size=args.batch_size,
                                          show_progress_bar=args.progress)
    report["dataset"] = dataset.name
    report["head"] = str(args.head)
    report["head_weights"] = model.head.quantized_to or "float32"
    report["base"] = model.config.base_model_name_or_path
    report["split"] = {"name": args.split, "max_queries": args.max_queries,
                       **(split_settings(model) if args.split == "test" else {})}
    report["index"]["source"] = how
    return report


def run(args: argparse.Namespace) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from retrieval_head.evaluation.compare import format_report

    try:
        report = evaluate_head(args)
    except (FileNotFoundError, ValueError) as err:  # data/format/teacher/index errors all name their cause
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"head {report['head']} ({report['head_weights']} weights; base {report['base']}) "
          f"vs teacher {report['teacher']['teacher_id']}, "
          f"split {report['split']['name']}; index {report['index']['source']}")
    print(format_report(report))
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"report written to {path}")
    return 0
