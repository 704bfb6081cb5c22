"""The package's shape (README "Data flow"): subpackages by stage, imports that only run down.

Imports are read with `ast`, those under `if TYPE_CHECKING:` and inside functions included:
a lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "flowagg"
# Top to bottom: a subpackage may import those after it, never one before it.
LAYERS = ("cli", "read", "service", "ingest", "delivery", "batches", "journal", "core")
MAX_MODULE_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The flowagg modules `name` imports (a package's names resolved to its modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in known else source)
    return {target for target in found if target in known and target != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> str | None:
    """The subpackage a module belongs to; None for the package's own `__init__`/`__main__`."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def upward(edges: dict[str, set[str]]) -> list[str]:
    out = []
    for source, targets in sorted(edges.items()):
        src = layer(source)
        for target in sorted(targets):
            dst = layer(target)
            if src is None:
                continue  # __main__ starts the CLI
            if dst is None:
                if target != "flowagg":
                    out.append(f"{source} -> {target} (outside every subpackage)")
            elif LAYERS.index(dst) < LAYERS.index(src):
                out.append(f"{source} -> {target} ({src} may not import {dst})")
    return out


def test_every_module_sits_in_a_subpackage_of_the_data_flow() -> None:
    loose = [
        name
        for name in modules()
        if name not in ("flowagg", "flowagg.__main__") and layer(name) not in LAYERS
    ]
    assert loose == []
    assert {path.name for path in PACKAGE.iterdir() if path.suffix == ".py"} == {
        "__init__.py",
        "__main__.py",
    }


def test_each_subpackage_says_what_it_owns_and_may_import() -> None:
    for pkg in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / pkg / "__init__.py").read_text()))
        assert doc and "May import" in doc, pkg


def test_imports_run_down_the_layers_and_never_in_a_circle() -> None:
    edges = graph()
    assert upward(edges) == []
    assert cycles(edges) == []


def test_no_module_is_over_the_size_a_reader_holds_in_mind() -> None:
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


@pytest.mark.parametrize(
    ("edges", "finds"),
    [
        # an upward import between two subpackages
        ({"flowagg.core.a": {"flowagg.service.b"}, "flowagg.service.b": set()}, "upward"),
        # a cycle inside one subpackage
        ({"flowagg.core.a": {"flowagg.core.b"}, "flowagg.core.b": {"flowagg.core.a"}}, "cycle"),
    ],
)
def test_the_guard_sees_what_it_guards(edges: dict[str, set[str]], finds: str) -> None:
    assert (upward(edges) != []) is (finds == "upward")
    assert (cycles(edges) != []) is (finds == "cycle")


def test_imports_are_read_from_lazy_and_type_checking_blocks_too(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ..service.daemon import Daemon\n"
        "def f():\n    from . import b\n"
    )
    known = {"flowagg.core.b", "flowagg.service.daemon", "flowagg.core.m"}
    found = imports_of("flowagg.core.m", source, known)
    assert found == {"flowagg.service.daemon", "flowagg.core.b"}
