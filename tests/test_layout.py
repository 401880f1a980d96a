"""The package's layout, as ARCHITECTURE.md draws it: imports flow one way, room by room, with no cycles."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "retrieval_head"
ROOMS = ["leaves", "core", "adapters", "io", "retrieval", "evaluation", "training", "agent", "integrations", "top"]
"""Bottom to top; a module imports (at module level) only from its own room or rooms below it. Leaves: the
version and the table of moved import paths; top: the package's face, the CLI and `python -m` entries."""
LEAVES = {"retrieval_head.version", "retrieval_head._moved"}
LATE_DOORS = {("core", "adapters"), ("core", "io")}
"""Upward imports allowed inside a function: `RetrievalModel`'s I/O methods and adapter checks."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    parts = module.split(".")
    if module in LEAVES:
        return "leaves"
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "top"


def imports(path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """(imported package module, at module level?) for every import of `path`, TYPE_CHECKING blocks left out."""
    tree = ast.parse(path.read_text())
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for node in guarded for n in ast.walk(node)}
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            assert node.level == 0, f"{path}: relative import (the package uses absolute ones)"
            base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        found += [(t, id(node) in top_level) for t in targets if t in modules]
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, bool]]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: imports(p, set(files)) for m, p in files.items()}


def test_no_import_cycles(graph):
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target, _ in graph[module]:
            if state.get(target) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(target):] + [module, target]))
            if target not in state:
                visit(target, trail + [module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_imports_flow_down_the_rooms(graph):
    wrong = []
    for module, targets in graph.items():
        for target, module_level in targets:
            low, high = ROOMS.index(room(target)), ROOMS.index(room(module))
            if low > high and (module_level or (room(module), room(target)) not in LATE_DOORS):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that run up the rooms: " + ", ".join(wrong)


def test_core_imports_nothing_above_it_at_module_level(graph):
    for module, targets in graph.items():
        if room(module) == "core":
            assert all(room(t) in ("leaves", "core") for t, top in targets if top), module


def test_file_names_are_unique_and_modules_small():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" and p.parent.name != "commands")
    assert [n for n, c in names.items() if c > 1] == []
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 420} == {}


def test_old_import_paths_still_work_with_a_warning():
    import importlib
    import sys

    sys.modules.pop("retrieval_head.persistence", None)
    with pytest.warns(DeprecationWarning, match="retrieval_head.persistence moved to retrieval_head.io.folder"):
        old = importlib.import_module("retrieval_head.persistence")
    from retrieval_head.core.config import HeadFolderError
    from retrieval_head.io.folder import read_config

    assert old.read_config is read_config and old.HeadFolderError is HeadFolderError
    with pytest.raises(AttributeError, match="moved to 'retrieval_head.io.folder'"):
        old.no_such_name  # noqa: B018


def test_saved_folders_module_path_is_stable_and_silent(recwarn):
    import importlib

    from retrieval_head.io.folder import HEAD_CLASS, INPUT_CLASS
    from retrieval_head.io.sentence_transformers_modules import RetrievalHeadInput

    assert INPUT_CLASS.startswith("retrieval_head.sentence_transformers_modules.")
    module = importlib.import_module(HEAD_CLASS.rsplit(".", 1)[0])
    assert module.RetrievalHeadInput is RetrievalHeadInput
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_results_and_docs_hold_no_absolute_machine_paths():
    root = PACKAGE.parent
    files = [root / "README.md", *root.glob("benchmarks/results/*.[jm][sd]*"), *root.glob("training/results/*"),
             *root.glob("heads/*/*.json"), *root.glob("heads/*/README.md")]
    assert len(files) > 10
    leaked = [str(f.relative_to(root)) for f in files if str(root) in f.read_text(encoding="utf-8", errors="ignore")
              or "/work/" in f.read_text(encoding="utf-8", errors="ignore")]
    assert leaked == []
