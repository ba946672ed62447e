"""The shape of the code (docs/architecture.md), checked on every module's imports, lazy ones included:
layers import only downwards, no package has an import circle, and serving code never reaches into the
indexing pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cxrmodel", "indexer", "search", "web", "radlens")  # lowest first
CXRMODEL_LAYERS = {  # inside cxrmodel, lowest first; shared modules are below everything
    "errors": 0, "constants": 0, "tables": 0, "hashing": 0, "imaging": 1, "model": 2, "labels": 3, "reporting": 4,
    "training": 4}
INDEXING_COMMANDS = {"radlens.commands.index", "radlens.commands.demo"}  # the CLI commands that run an index


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations/versions" in path.as_posix():
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (absolute names; relative ones resolved), at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    return {m for m in found if m.split(".")[0] in PACKAGES}


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def test_layers_import_only_downwards():
    wrong = [(m, i) for m, deps in IMPORTS.items() for i in deps
             if PACKAGES.index(i.split(".")[0]) > PACKAGES.index(m.split(".")[0])]
    assert not wrong, wrong


def test_cxrmodel_subpackages_import_only_downwards():
    def layer(module: str) -> int:
        parts = module.split(".")
        return CXRMODEL_LAYERS[parts[1]] if len(parts) > 1 else -1

    wrong = [(m, i) for m, deps in IMPORTS.items() if m.startswith("cxrmodel.")
             for i in deps if i.startswith("cxrmodel.") and i.split(".")[1] != m.split(".")[1]
             and layer(i) >= layer(m) and layer(i) > 0]
    assert not wrong, wrong


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle_inside_a_package(package):
    graph = {m: {i for i in deps if i in MODULES and i.split(".")[0] == package and i != m}
             for m, deps in IMPORTS.items() if m.split(".")[0] == package}
    for module in graph:  # a package's __init__ importing its own modules is not a circle through them
        graph[module] = {i for i in graph[module] if not module.startswith(i + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_serving_code_never_imports_the_indexing_pipeline():
    users = {m for m, deps in IMPORTS.items() if "indexer.pipeline" in deps and m.split(".")[0] in
             ("search", "web", "radlens")}
    assert users <= INDEXING_COMMANDS, users - INDEXING_COMMANDS


def test_the_checker_sees_imports():  # the graph is not empty by mistake
    assert "cxrmodel.model.encoder" in IMPORTS["search.engine"]
    assert "cxrmodel.errors" in IMPORTS["cxrmodel.model.lora"]
