"""`retrieval-head main`: the main job. Train a fresh head for SmolLM2-135M -> all-MiniLM-L6-v2 on a sample of
the bundled data (< 15 min on 2 CPU cores, the LM pass included), evaluate it against the teacher on held-out
test splits of DSTC11 and SciFact, save it with its card, and report it beside the shipped head."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("main", help="The main job: train, evaluate and save a head for the default pair.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="heads/main-job", help="Folder of the fresh head (default: %(default)s).")
    parser.add_argument("--shipped", default="heads/smollm2-135m-minilm",
                        help="The shipped head to report beside it (default: %(default)s).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a value of the main job's recipe, e.g. --set data.max_train_queries=100.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import logging
    import sys

    import torch

    from retrieval_head.training.main_job import main_recipe, run_main_job
    from retrieval_head.training.recipe import RecipeError, parse_overrides

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 16)))
    try:
        overrides = parse_overrides(args.set)
        run_main_job(args.output, args.shipped, main_recipe(**overrides), show_progress_bar=not args.quiet)
    except (RecipeError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
