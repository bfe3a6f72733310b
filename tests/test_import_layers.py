"""Imports point one way (docs/architecture.md, "Dependency direction"), checked on the source text:
every import counts, also those made only for type checking or inside a function, and nothing is
imported to find out.

`LAYERS` lists packages from the top down: a module may import its own layer and the layers below
it, never one above, and the modules of the checked layers import no module that (directly or not)
imports them back. Packages in `NOT_YET_CHECKED` still have circles that are being removed (style.md,
"Where our tree still bends"); moving one into `LAYERS` at its place is how this check grows. Every
package of `tether` is in one of the lists, so a new one has to be placed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: tuple[str, ...] = (
    # "tether.cli" belongs on top, "tether.api" between tether.server and tether.protocols
    "tether.server",
    "tether.protocols",  # listeners take the Hub (`start_mqtt(hub)`); the hub never imports them
    "tether.hub",  # the composition root builds cluster and messaging services
    "tether.cluster",
    "tether.messaging",
)
NOT_YET_CHECKED: tuple[str, ...] = (
    "tether.cli",  # cli.context ↔ local / remote
    "tether.api",  # route tables ↔ route modules ↔ context, app ↔ *_routes via mount
    "tether.console",  # beside api: console.routes ↔ api.app via mount
    "tether.registry",  # registry ↔ security ↔ storage
    "tether.security",
    "tether.storage",
    "tether.observability",
)
SHARED: tuple[str, ...] = ("tether", "tether.config", "tether.errors")  # leaves every layer may import

Graph = Mapping[str, set[str]]


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name → file, for every module under `src/tether`."""
    found: dict[str, Path] = {}
    for path in sorted((src / "tether").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The `tether` modules `name` imports (`from pkg import sub` counts as importing `pkg.sub`)."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    mods = modules(src)
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def layer_of(module: str, layers: Iterable[str]) -> str | None:
    """The longest listed package containing `module` (None when none does)."""
    best = None
    for layer in layers:
        if (module == layer or module.startswith(layer + ".")) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def layer_violations(graph: Graph, layers: tuple[str, ...]) -> list[str]:
    """`importer -> imported` for every import from a layer into a layer above it."""
    rank = {layer: i for i, layer in enumerate(layers)}
    found = []
    for importer, targets in graph.items():
        own = layer_of(importer, layers)
        if own is None:
            continue
        for target in sorted(targets):
            other = layer_of(target, layers)
            if other is not None and rank[other] < rank[own]:
                found.append(f"{importer} ({own}) -> {target} ({other})")
    return found


def cycles(graph: Graph) -> list[list[str]]:
    """The import circles of `graph`: its strongly connected components of more than one module
    (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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
    return found


def restricted(graph: Graph, layers: Iterable[str]) -> dict[str, set[str]]:
    """The part of `graph` among the modules of `layers`."""
    layers = tuple(layers)
    keep = {m for m in graph if layer_of(m, layers) is not None}
    return {m: graph[m] & keep for m in keep}


# --- the tree ---------------------------------------------------------------------------------


def test_every_package_is_placed() -> None:
    placed = (*LAYERS, *NOT_YET_CHECKED, *SHARED)
    unplaced = sorted(m for m in modules() if layer_of(m, placed) is None)
    assert not unplaced, f"add these to LAYERS (or NOT_YET_CHECKED) in {__file__}: {unplaced}"


def test_each_layer_imports_only_the_layers_below_it() -> None:
    assert layer_violations(import_graph(), LAYERS) == []


def test_no_import_circle_within_the_checked_layers() -> None:
    assert cycles(restricted(import_graph(), LAYERS)) == []


def test_cluster_and_messaging_never_name_a_protocol() -> None:
    graph = import_graph()
    below = restricted(graph, ("tether.hub", "tether.cluster", "tether.messaging"))
    named = sorted(f"{m} -> {t}" for m in below for t in graph[m] if t.startswith("tether.protocols"))
    assert named == []


# --- the checker itself ---------------------------------------------------------------------------


def test_the_checker_finds_circles_and_upward_imports() -> None:
    graph = {
        "t.hub": {"t.cluster.bus", "t.messaging.a"},
        "t.cluster.bus": {"t.protocols.hooks"},  # upward
        "t.protocols.hooks": {"t.hub"},  # closes the circle hub -> bus -> hooks -> hub
        "t.messaging.a": {"t.messaging.b"},
        "t.messaging.b": set(),
    }
    layers = ("t.protocols", "t.hub", "t.cluster", "t.messaging")
    assert cycles(graph) == [["t.cluster.bus", "t.hub", "t.protocols.hooks"]]
    assert layer_violations(graph, layers) == ["t.cluster.bus (t.cluster) -> t.protocols.hooks (t.protocols)"]
    graph["t.cluster.bus"] = {"t.messaging.a"}
    assert cycles(graph) == [] and layer_violations(graph, layers) == []


def test_relative_and_type_checking_imports_count(tmp_path: Path) -> None:
    package = tmp_path / "tether" / "pkg"
    package.mkdir(parents=True)
    (tmp_path / "tether" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tether.pkg.b import X\n")
    (package / "b.py").write_text("def f():\n    from .a import Y\n")
    graph = import_graph(tmp_path)
    assert graph["tether.pkg"] == {"tether.pkg.a"}
    assert graph["tether.pkg.a"] == {"tether.pkg.b"} and graph["tether.pkg.b"] == {"tether.pkg.a"}
    assert cycles(graph) == [["tether.pkg.a", "tether.pkg.b"]]
