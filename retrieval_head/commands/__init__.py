"""Sub-commands of the `retrieval-head` CLI. Each module defines `register(subparsers)` that adds a parser
whose `run` default is a function `run(args) -> int`. Modules import heavy dependencies inside `run`."""
