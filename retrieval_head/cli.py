"""`retrieval-head` command line: one sub-command per module in `retrieval_head.commands`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Sequence

from retrieval_head import commands


def build_parser() -> argparse.ArgumentParser:
    """A parser with every sub-command found in `retrieval_head.commands` (each module has `register`)."""
    parser = argparse.ArgumentParser(prog="retrieval-head", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the chosen sub-command; returns its exit status."""
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
