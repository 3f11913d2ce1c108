"""The modules of ``gateway`` import each other without cycles.

The graph has one edge per module-level import of another ``gateway`` module (imports inside
functions and under ``if TYPE_CHECKING:`` are not followed: they do not run at import time, or
run only after every module involved is loaded). ``from gateway.pkg import name`` is an edge to
``gateway.pkg.name`` when that is a module, else to ``gateway.pkg`` (its ``__init__``).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "gateway"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(
    tree: ast.Module, type_checking: bool = False
) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: top level, and inside top-level
    ``try``/``if`` blocks other than ``if TYPE_CHECKING:`` (included with ``type_checking``)."""
    found: list[ast.Import | ast.ImportFrom] = []
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if type_checking or not _is_type_checking(node.test):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend(node.body)
            pending.extend(node.orelse)
            pending.extend(node.finalbody)
            for handler in node.handlers:
                pending.extend(handler.body)
        elif isinstance(node, ast.With):
            pending.extend(node.body)
    return found


def import_graph(modules: dict[str, Path], type_checking: bool = False) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in _module_level_imports(tree, type_checking):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    drop = node.level - 1 if is_package else node.level
                    anchor = anchor[: len(anchor) - drop]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None. Iterative DFS, three colours."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(graph):
        if start in state:
            continue
        path: list[str] = [start]
        iterators = [iter(sorted(graph[start]))]
        state[start] = 1
        while iterators:
            nxt = next(iterators[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iterators.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iterators.append(iter(sorted(graph[nxt])))
    return None


def gateway_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def test_gateway_has_no_import_cycles() -> None:
    graph = import_graph(gateway_modules())
    assert len(graph) > 50  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# Type-only cycles left, each with the reason; the type-only edges inside a group are ignored.
KNOWN_TYPE_CYCLES = [
    # The server builds client connections (directly, or through the TLS handshake protocol,
    # which hands its connection to the client protocol); both name the server back.
    {"gateway.proxy.listener", "gateway.proxy.server", "gateway.tls.accept"},
    # An exchange and its tries name each other, and a try names the downstream it reports to
    # (in annotations only: attempt.py imports neither at run time).
    {"gateway.proxy.attempt", "gateway.proxy.downstream", "gateway.proxy.exchange"},
    # contexts names certs' CertInfo and calls certs lazily; certs loads chains with contexts.
    {"gateway.tls.certs", "gateway.tls.contexts"},
    # The upstream HTTP/2 pool holds connections that hold streams, each naming its pool and
    # connection back (one module before it was split; run-time imports go pool -> connection
    # -> stream only).
    {"gateway.proxy.h2.client", "gateway.proxy.h2.connection", "gateway.proxy.h2.stream"},
    # A native stream reports itself at its end; the report reads the stream's fields.
    {"gateway.proxy.h2.forward", "gateway.proxy.h2.native_report"},
]


def test_gateway_layers_even_for_type_checking() -> None:
    """With the ``if TYPE_CHECKING:`` imports too: a cycle there is a layering smell (the
    snapshot naming the transport, the registry naming its manager) even if it cannot fail at
    import time."""
    modules = gateway_modules()
    runtime = import_graph(modules)
    graph = import_graph(modules, type_checking=True)
    for group in KNOWN_TYPE_CYCLES:
        assert group <= graph.keys(), f"stale entry: {sorted(group - graph.keys())}"
        for module in group:
            graph[module] -= group - runtime[module]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (type-level): " + " -> ".join(cycle or [])


def test_snapshot_does_not_import_the_transport() -> None:
    graph = import_graph(gateway_modules(), type_checking=True)
    assert "gateway.proxy.upstream" not in graph["gateway.snapshot"]
    assert "gateway.proxy.listener" not in graph["gateway.snapshot"]
    assert "gateway.proxy.server" not in graph["gateway.snapshot"]
    assert "gateway.pools" in graph["gateway.snapshot"]


@pytest.mark.parametrize(
    ("graph", "has_cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b", "c"}, "b": {"c"}, "c": {"d"}, "d": {"b"}}, True),
        ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, False),
    ],
)
def test_find_cycle(graph: dict[str, set[str]], has_cycle: bool) -> None:
    cycle = find_cycle(graph)
    assert (cycle is not None) == has_cycle
    if cycle is not None:
        assert cycle[0] == cycle[-1]
        assert all(b in graph[a] for a, b in itertools.pairwise(cycle))


def test_type_checking_imports_are_not_edges(tmp_path: Path) -> None:
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.b\n"
    )
    (pkg / "b.py").write_text("from p import a\n\ndef f():\n    from p import c\n")
    (pkg / "c.py").write_text("from . import b\n")
    modules = {
        "p": pkg / "__init__.py",
        "p.a": pkg / "a.py",
        "p.b": pkg / "b.py",
        "p.c": pkg / "c.py",
    }
    graph = import_graph(modules)
    assert graph == {"p": set(), "p.a": set(), "p.b": {"p.a"}, "p.c": {"p.b"}}
    with_types = import_graph(modules, type_checking=True)
    assert with_types["p.a"] == {"p.b"}
    assert find_cycle(with_types) == ["p.a", "p.b", "p.a"]
