"""The package's import graph: no cycles, imports point down the layers, modules stay short.

The graph is read from the source with `ast` (nothing is imported), so an import inside a
function counts like one at the top of a module. Imports under `if TYPE_CHECKING:` (for
annotations; they never run) count for the layers but not for cycles. Layers, lowest first:

    base (top-level modules: config, errors, stages, fileio, logs, ...) < data < model
    < deploy < evaluation < training < demo < cli

A module may import its own layer and the layers below it, never one above.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "tfgan_ct"
LAYERS = ["base", "data", "model", "deploy", "evaluation", "training", "demo", "cli"]
MAX_LINES = 500  # per module, outside demo/


def module_name(path: Path) -> str:
    """tfgan_ct/data/convert.py -> 'tfgan_ct.data.convert'; a package's __init__.py -> the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> str:
    """The layer of module `name`: its subpackage, 'cli', or 'base' for the top-level modules."""
    parts = name.split(".")
    if len(parts) == 1:
        return "base"  # tfgan_ct/__init__.py
    if len(parts) == 2:
        return "cli" if parts[1] == "cli" else "base"
    return parts[1]


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes inside `if TYPE_CHECKING:` blocks."""
    guarded: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.body:
                guarded.update(ast.walk(child))
    return guarded


def imported_names(path: Path, name: str, is_package: bool, runtime_only: bool) -> set[str]:
    """Dotted names that `path` imports (anywhere in the file), relative imports resolved."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def import_graph(runtime_only: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports (the most specific module each import names).

    `runtime_only` leaves out the imports under `if TYPE_CHECKING:`.
    """
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for imported in imported_names(path, name, path.name == "__init__.py", runtime_only):
            # `from tfgan_ct.data.convert import convert` names the module tfgan_ct.data.convert;
            # `from tfgan_ct.data import convert` names it too; `import tfgan_ct.data` names the package.
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert layer("tfgan_ct.errors") == "base" and layer("tfgan_ct.cli") == "cli"
    assert layer("tfgan_ct.deploy.serving.client") == "deploy"
    assert "tfgan_ct.errors" in graph["tfgan_ct.config_checks"]
    # config_checks names config's classes for annotations only.
    assert "tfgan_ct.config" in graph["tfgan_ct.config_checks"]
    assert "tfgan_ct.config" not in import_graph(runtime_only=True)["tfgan_ct.config_checks"]
    # cli imports the command implementations inside the command functions.
    assert "tfgan_ct.demo.quickstart" in graph["tfgan_ct.cli"]
    assert set(LAYERS) >= {layer(name) for name in graph}


def test_no_import_cycles():
    found = cycles(import_graph(runtime_only=True))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_point_down_the_layers():
    upward = [f"{name} ({layer(name)}) imports {target} ({layer(target)})"
              for name, targets in sorted(import_graph().items()) for target in sorted(targets)
              if LAYERS.index(layer(target)) > LAYERS.index(layer(name))]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


@pytest.mark.parametrize("name", sorted(name for name in modules() if layer(name) != "demo"))
def test_modules_stay_short(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{modules()[name].relative_to(REPO)}: {lines} lines (at most {MAX_LINES} outside demo/)"
