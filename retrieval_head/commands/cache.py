"""`retrieval-head cache --recipe R.yaml`: fill a recipe's caches (LM features, teacher embeddings) before training.

It builds exactly what `retrieval-head train` reads (the same keys), in shards written as they finish: run it in the
background with its progress bar, kill it and run it again to resume; `train` then starts from the cache.
Under `accelerate launch` every process extracts its share of the LM feature shards (for more cores or GPUs:
`accelerate launch -m retrieval_head.cli cache --recipe R.yaml`); the first process then fills the teacher caches.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("cache", help="Fill a recipe's feature and teacher caches (resumable).",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="Recipe YAML (see training/recipes/).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a recipe value, as for `train` (e.g. --set data.corpus_texts=2048).")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import logging
    import sys
    import time

    from accelerate import PartialState

    from retrieval_head.core.model import get_retrieval_model
    from retrieval_head.retrieval.fingerprint import TeacherFingerprint
    from retrieval_head.train import load_recipe_with_overrides
    from retrieval_head.training.datasets import build_training_data, prefill_features
    from retrieval_head.training.recipe import RecipeError
    from retrieval_head.training.setup import TeacherDimError, head_config, load_models, recipe_cache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        recipe = load_recipe_with_overrides(args.recipe, args.set)
        base, tokenizer, teacher = load_models(recipe)
        fingerprint = TeacherFingerprint.from_sentence_transformer(teacher, teacher_id=recipe.teacher.model,
                                                                   revision=recipe.teacher.revision)
        model = get_retrieval_model(base, head_config(recipe, fingerprint), tokenizer).eval()
        cache = recipe_cache(recipe)
        state = PartialState()
        if state.num_processes > 1:
            model.to(state.device)
            prefill_features(recipe, model, cache, state.process_index, state.num_processes,
                             show_progress_bar=not args.quiet and state.is_main_process)
            state.wait_for_everyone()
        if not state.is_main_process:
            return 0
        data = build_training_data(recipe, model, teacher, fingerprint, cache, show_progress_bar=not args.quiet)
    except (RecipeError, TeacherDimError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    texts = sum(len(s.items) for s in data.sources)
    size = sum(f.stat().st_size for f in cache.root.rglob("*") if f.is_file()) if cache.root.exists() else 0
    print(f"cache {cache.root}: {texts} texts of {len(data.sources)} sources, {len(data.doc_ids)} documents, "
          f"{size / 2**20:.0f} MiB, {time.perf_counter() - started:.0f} s")
    return 0
