"""Entry point for `accelerate launch -m retrieval_head.train --recipe R.yaml --output DIR [--resume]`.

Thin on purpose: it parses arguments and calls `retrieval_head.training.train`; every process of a
distributed launch runs it, and `accelerate` wires them together (DDP).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retrieval_head.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="Recipe YAML (see training/recipes/).")
    parser.add_argument("--output", required=True, help="Run folder: head, recipe, log, report, checkpoints.")
    parser.add_argument("--resume", action="store_true", help="Continue the run in --output from its last checkpoint.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a recipe value, e.g. --set train.lr=1e-4 --set head.layer=24 (YAML values).")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")


def load_recipe_with_overrides(path: str, overrides: Sequence[str]):
    from retrieval_head.training.recipe import Recipe, parse_overrides

    recipe = Recipe.load(path)
    return recipe.replace(**parse_overrides(overrides)) if overrides else recipe


def run(args: argparse.Namespace) -> int:
    from retrieval_head.training.recipe import RecipeError
    from retrieval_head.training.setup import TeacherDimError
    from retrieval_head.training.trainer import TrainingStopped, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    try:
        recipe = load_recipe_with_overrides(args.recipe, args.set)
        result = train(recipe, args.output, resume=args.resume, show_progress_bar=not args.quiet)
    except (RecipeError, TeacherDimError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.test is not None:
        from retrieval_head.training.split_evaluation import format_report

        title = f"{recipe.name}: {recipe.train.keep} head (step {result.kept_step}) on the test splits"
        print(format_report(result.test, title))
        print(f"head, recipe, log and report written to {result.output_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
