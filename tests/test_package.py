"""The package's shape: no import cycles, and methods and callbacks see the engine only through
fedlit.context (a method is one module, programmed against a narrow API)."""

import ast

from conftest import ROOT

PACKAGES = ("fedlit", "callbacks")


def module_imports(top_level_only: bool = False) -> dict[str, set[str]]:
    """Every module of fedlit and callbacks, and the modules of the two it imports (at run time
    or for type checking: a cycle of either kind couples the modules).

    With `top_level_only`, only imports run when the module is loaded, plus the package
    `__init__`s they run first: a cycle there fails at import time, whichever module is
    imported first."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        for node in nodes:
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            if top_level_only:  # importing a.b.c from outside a.b runs a.b's __init__ first
                parents = {
                    ".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)
                }
                targets += [p for p in parents if not name.startswith(p + ".")]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    assert cycles(module_imports()) == []


def test_no_module_level_import_cycle_through_a_package_init():
    assert cycles(module_imports(top_level_only=True)) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_methods_and_callbacks_never_import_the_engine():
    graph = module_imports()
    importers = {m for m, targets in graph.items() if "fedlit.engine" in targets}
    assert importers == {"fedlit.cli"}  # the entry point runs it; nothing builds on it
