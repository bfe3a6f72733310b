"""Each package has one module that knows its parts, and the parts know nothing of it: no import
circles inside `tether.api` and `tether.cli` (runtime imports; `TYPE_CHECKING` blocks are not imports),
route modules never import `api.app`, and CLI backends never import the command layer (`cli.context`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "tether"


def _runtime_imports(path: Path, package: str) -> set[str]:
    """Modules of `tether.{package}` that `path` imports at run time (function-level imports count)."""
    found: set[str] = set()
    prefix = f"tether.{package}"

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module == prefix:
                found.update(f"{prefix}.{alias.name}" for alias in node.names)
            elif node.module and node.module.startswith(prefix + "."):
                found.add(node.module)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name.startswith(prefix + "."))

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _graph(package: str) -> dict[str, set[str]]:
    return {f"tether.{package}.{p.stem}": _runtime_imports(p, package)
            for p in (SRC / package).glob("*.py") if p.stem != "__init__"}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


@pytest.mark.parametrize("package", ["api", "cli"])
def test_no_import_circles(package: str) -> None:
    assert _cycles(_graph(package)) == []


def test_api_route_modules_do_not_know_the_app() -> None:
    graph = _graph("api")
    knowing = sorted(m for m, deps in graph.items() if "tether.api.app" in deps)
    assert knowing == []  # only api.app lists the parts (FEATURES)


def test_cli_backends_do_not_know_the_command_layer() -> None:
    graph = _graph("cli")
    for backend in ("backend", "local", "remote", "running", "factory"):
        assert "tether.cli.context" not in graph[f"tether.cli.{backend}"], backend
