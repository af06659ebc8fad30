"""The package's floors (../shared/ARCHITECTURE.md in the development checkout; the README's module
map): every module imports only from its own floor or lower ones, imports inside functions
included; no import cycle; no `_private` name of one module used by another.

Parsed with `ast`, nothing is imported, so a module that would only fail at run time is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "raysearch"

# Module-name prefixes by floor, bottom first; the longest matching prefix decides.
FLOORS: dict[int, tuple[str, ...]] = {
    1: ("raysearch.version", "raysearch.storage", "raysearch.runtime", "raysearch.errors", "raysearch.images",
        "raysearch.samples", "raysearch.progress", "raysearch.metrics",
        # Rendering: templates, thumbnails, plots, the search results page, headless Chromium.
        "raysearch.pages"),
    2: ("raysearch.sources", "raysearch.models", "raysearch.edits"),
    3: ("raysearch.formats", "raysearch.datasets"),
    4: ("raysearch.embed", "raysearch.index"),
    5: ("raysearch.search", "raysearch.rerank", "raysearch.verify"),
    6: ("raysearch.builder", "raysearch.add", "raysearch.activate", "raysearch.serve", "raysearch.train"),
    7: ("raysearch.evaluate", "raysearch.pages.reports"),   # the report pages read the evaluations' reports
    8: ("raysearch.cli", "raysearch.demo", "raysearch.api", "raysearch.__main__"),
}
FACE = "raysearch"   # the package itself: the top floor (it may hand on the Python API)
TOP = max(FLOORS)


def module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = module_names()


def floor_of(module: str) -> int:
    if module == FACE:
        return TOP
    best, floor = "", None
    for level, prefixes in FLOORS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, floor = prefix, level
    if floor is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__}")
    return floor


def _owner(name: str) -> str:
    """The module a dotted import name refers to (its longest prefix that is a module)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every raysearch import of `module`,
    at any depth (module level, functions, TYPE_CHECKING blocks)."""
    path = MODULES[module]
    return imports_in(module, path.read_text(), path.name == "__init__.py")


def imports_in(module: str, source: str, is_package: bool = False) -> list[tuple[str, str | None, int]]:
    """`imports_of` for the source text of `module`."""
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(_owner(a.name), None, node.lineno) for a in node.names if a.name.split(".")[0] == "raysearch"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "raysearch":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:   # `from raysearch import storage`: the module storage
                    out.append((full, None, node.lineno))
                else:
                    out.append((_owner(base), alias.name, node.lineno))
    return [(target, name, line) for target, name, line in out if target != module]


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor_of(module)


def test_no_import_goes_up_a_floor():
    upward = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {m} (floor {floor_of(m)}) imports {t} (floor {floor_of(t)})"
        for m, edges in GRAPH.items() for t, _, line in edges
        if t != FACE and floor_of(t) > floor_of(m)
    ]
    assert not upward, "imports that go up the floors:\n" + "\n".join(upward)


def test_only_the_top_floor_imports_the_package_face():
    # `from raysearch import storage` names a module and is fine; the face's own names are not.
    uses = [f"{m}:{line} imports {name!r} from the package face"
            for m, edges in GRAPH.items() for t, name, line in edges
            if t == FACE and name is not None and floor_of(m) < TOP]
    assert not uses, "\n".join(uses)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    # A package's __init__ that hands on its submodules' names is not a cycle with them: Python
    # imports the package first whatever the submodule imports, so only module -> module counts.
    graph = {m: {t for t, _, _ in edges if t != FACE and not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}
             for m, edges in GRAPH.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _defined_names(tree: ast.AST) -> set[str]:
    """Every name a module defines or assigns: functions, classes, attributes (self.x = ...)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_crosses_modules():
    crossings = []
    own_names = {m: _defined_names(ast.parse(p.read_text())) for m, p in MODULES.items()}
    for m, edges in GRAPH.items():
        crossings += [f"{m}:{line} imports {name} from {t}" for t, name, line in edges if name and _is_private(name)]
        # A private attribute used in a module that does not define it belongs to another one
        # (e.g. searcher._parts read by an evaluation).
        tree = ast.parse(MODULES[m].read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _is_private(node.attr) and node.attr not in own_names[m]
                    and any(node.attr in names for other, names in own_names.items() if other != m)):
                crossings.append(f"{m}:{node.lineno} uses .{node.attr}, defined in another module")
    assert not crossings, "\n".join(crossings)


@pytest.mark.parametrize("source, expected", [
    ("from raysearch.search import Searcher\n", [("raysearch.search", "Searcher")]),
    ("def f():\n    from raysearch.index import store\n", [("raysearch.index.store", None)]),
    ("import raysearch.images\n", [("raysearch.images", None)]),
    ("from raysearch.formats.embeddings import _private\n", [("raysearch.formats.embeddings", "_private")]),
    ("from .queries import QuerySet\n", [("raysearch.evaluate.queries", "QuerySet")]),
])
def test_imports_are_read_at_any_depth(source, expected):
    got = [(t, n) for t, n, _ in imports_in("raysearch.evaluate.probe", source)]
    assert got == expected
