"""The code's layout rules that a newcomer relies on."""
from __future__ import annotations

import ast
import importlib.util
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


def _module(path: Path) -> str:
    return ".".join(path.relative_to(BUILDER.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """The modules `path` imports, anywhere in it (lazy imports too)."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}  # `from . import nix`
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_the_import_graph_runs_one_way():
    modules = {_module(p) for p in MODULES}
    graph = {_module(p): (_imports(p) & modules) - {_module(p)} for p in MODULES}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join(path + (module,))
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, path + (module,))
            done.add(module)

    for module in sorted(graph):
        visit(module, ())
    assert sum(map(len, graph.values())) > 30  # the imports were read
