"""Every error the package raises on purpose derives from `RetrievalHeadError` (and from the builtin it refines)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import retrieval_head
from retrieval_head import RetrievalHeadError

PACKAGE = Path(retrieval_head.__file__).parent


def public_exception_classes() -> list[type[BaseException]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and not n.name.startswith("_")]
        if not names:
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        classes = [getattr(module, n) for n in names]
        found += [c for c in classes if isinstance(c, type) and issubclass(c, BaseException)]
    return found


def test_every_public_error_is_a_retrieval_head_error() -> None:
    errors = public_exception_classes()
    assert len(errors) >= 12, errors  # the walk found the package's errors (config, base, recipe, export, ...)
    assert [e.__name__ for e in errors if not issubclass(e, RetrievalHeadError)] == []


def test_errors_keep_their_builtin_base() -> None:
    from retrieval_head.io.export import ExportError
    from retrieval_head.training.trainer import TrainingStopped

    assert issubclass(retrieval_head.HeadFolderError, ValueError) and issubclass(ExportError, ValueError)
    assert issubclass(TrainingStopped, RuntimeError)
    try:
        raise retrieval_head.HeadFolderError("not a head")
    except RetrievalHeadError as caught:  # one except clause catches them all
        assert "not a head" in str(caught)
