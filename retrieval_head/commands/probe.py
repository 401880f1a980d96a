"""`retrieval-head probe --recipe R.yaml`: fit a quick linear head per cached (layer, pooling) and report its
alignment and retrieval retention vs the teacher on the dev splits, so the recipe's choice is measured."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("probe", help="Measure layers x poolings with a quick linear head.",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="Recipe YAML: its data, features and teacher are used.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Override a recipe value.")
    parser.add_argument("--output", help="Write the probe result (JSON) here.")
    parser.add_argument("--apply", metavar="RECIPE_OUT",
                        help="Write a copy of the recipe with head.layer/pooling set to the probe's best.")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import logging

    from retrieval_head.train import load_recipe_with_overrides
    from retrieval_head.training.probe import format_probe, probe_recipe
    from retrieval_head.training.recipe import RecipeError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    try:
        recipe = load_recipe_with_overrides(args.recipe, args.set)
        result = probe_recipe(recipe)
    except (RecipeError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_probe(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"probe written to {args.output}")
    if args.apply:
        best = result["best"]
        recipe.replace(**{"head.layer": best["layer"], "head.pooling": best["pooling"]}).save(args.apply)
        print(f"recipe with layer {best['layer']} / {best['pooling']} written to {args.apply}")
    return 0
