"""The code's layout rules that a newcomer relies on."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # pure logic: part of scripts/test-fast

BUILDER = Path(__file__).resolve().parent.parent / "builder"
MODULES = sorted(p for p in BUILDER.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(BUILDER)))
def test_module_docstrings_say_what_in_a_few_lines(path):
    # The reasoning behind a module (alternatives, measurements) belongs in docs/design.md.
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert path.name == "__init__.py" or docstring, "no module docstring"
    assert len(docstring.splitlines()) <= 6, "move the reasoning to docs/design.md"
