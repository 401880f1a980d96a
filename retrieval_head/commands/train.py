"""`retrieval-head train --recipe R.yaml --output DIR`: train a head (one process; for several, use
`accelerate launch -m retrieval_head.train ...` with the same arguments)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from retrieval_head.train import add_train_arguments

    parser = subparsers.add_parser("train", help="Train a head from a recipe (distillation against its teacher).",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from retrieval_head.train import run

    return run(args)
