"""The package's import graph: no cycles, and the layers import downwards only."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "flatjax"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The flatjax module ``name`` refers to (itself, or the package that defines it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every flatjax module ``module`` imports, at module level or inside functions."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the submodule; ``from pkg import name``
            # reads a name defined by the package's __init__.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name == "flatjax" or name.startswith("flatjax."):
                target = _resolve(name)
                if target is not None and target != module:
                    out.add(target)
    return out


GRAPH = {module: _imports(module) for module in MODULES}


def _cycle() -> list[str] | None:
    """One import cycle of the graph, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_the_packages_imports():
    # The test would pass vacuously on an empty graph: check a few known edges.
    assert "flatjax.training.algorithms" in GRAPH["flatjax.training.config"]
    assert "flatjax._mesh" in GRAPH["flatjax"]


def test_no_import_cycle():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(
    ("flatjax.training", "flatjax.cli", "flatjax._results", "flatjax._restore", "flatjax.configs",
     "flatjax.__main__"))))
def test_the_library_does_not_import_the_training_library_or_the_cli(module):
    """Optimizers, measures, theory, models and data stand without training and the CLI."""
    banned = {m for m in GRAPH[module]
              if m.startswith(("flatjax.training", "flatjax.cli", "flatjax._results",
                                    "flatjax._restore"))}
    assert not banned, f"{module} imports {sorted(banned)}"


def test_no_library_module_imports_the_cli():
    users = sorted(m for m, deps in GRAPH.items() if "flatjax.cli" in deps
                   and m not in ("flatjax.cli", "flatjax.__main__"))
    assert not users, f"{users} import flatjax.cli"
