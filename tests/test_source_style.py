"""The style rules of DESIGN.md that a machine can check: a docstring on every module, lines of at
most 120 characters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("bevel", "benchmarks", "tests") for p in (ROOT / folder).rglob("*.py"))
MAX_COLUMNS = 120


def test_the_sources_are_found():
    assert len(SOURCES) > 50 and ROOT / "bevel" / "__init__.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_has_a_docstring_and_short_lines(path):
    text = path.read_text(encoding="utf-8")
    assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(ROOT)} has no module docstring"
    long = [n for n, line in enumerate(text.splitlines(), 1) if len(line) > MAX_COLUMNS]
    assert not long, f"{path.relative_to(ROOT)}: lines {long} are longer than {MAX_COLUMNS} characters"
