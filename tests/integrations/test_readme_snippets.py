"""The README's "use it with" snippets (the standalone export too) run as written, on the shipped heads and the
embedded teacher."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def snippets() -> dict[str, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- snippet: ([\w-]+) -->\n```python\n(.*?)```", text, flags=re.S))


def test_the_readme_has_its_four_snippets() -> None:
    assert sorted(snippets()) == ["export", "langchain", "qdrant", "sentence-transformers"]


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["sentence-transformers", "export", "langchain", "qdrant"])
def test_a_readme_snippet_runs(name: str, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")
    exec(compile(snippets()[name], f"README.md:{name}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    expected = {"sentence-transformers": r"^1\.0", "langchain": "free parking", "qdrant": r"\[\['d1'\]\]",
                "export": "^True$"}[name]
    assert re.search(expected, out.strip()), out
