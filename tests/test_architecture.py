"""The shape of the code stays as issue 18 left it: no import cycles among deepfeat's modules, and
no function too long to read at once. Both are static checks (ast over src/deepfeat, nothing imported).

Import graph: an edge A -> B for each import A runs when it is imported, that is each ``import``
at module level (also inside a module-level ``if``/``try``/``with``), not those inside functions
(run later, on purpose lazy) or under ``if TYPE_CHECKING:`` (never run). ``from P import x`` is an
edge to the module ``P.x`` when there is one, else to ``P`` itself (for a package, its
``__init__``). The implicit import of a module's parent package is not an edge, so a package
``__init__`` that re-exports its submodules is no cycle; a submodule that imports names from its
own package's ``__init__`` is one (the ``__init__`` imports it back)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: the guard; the aim (issue 18) is about 80 lines
MAX_FUNCTION_LINES = 100


def _modules(src: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package ``__init__``) for every module under src/deepfeat."""
    mods = {}
    for p in sorted((src / "deepfeat").rglob("*.py")):
        parts = list(p.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_imports(body: list[ast.stmt]):
    """The import statements that run when a module is imported."""
    for st in body:
        if isinstance(st, (ast.Import, ast.ImportFrom)):
            yield st
        elif isinstance(st, ast.If):
            if not _is_type_checking(st.test):
                yield from _import_time_imports(st.body)
            yield from _import_time_imports(st.orelse)
        elif isinstance(st, ast.Try):
            for block in (st.body, st.orelse, st.finalbody, *(h.body for h in st.handlers)):
                yield from _import_time_imports(block)
        elif isinstance(st, ast.With):
            yield from _import_time_imports(st.body)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the deepfeat modules it imports at import time (see the module docstring)."""
    mods = _modules(src)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        for st in _import_time_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(st, ast.Import):
                targets = [a.name for a in st.names]
            else:
                if st.level:
                    base = package.split(".")[: len(package.split(".")) - (st.level - 1)]
                    origin = ".".join(base + ([st.module] if st.module else []))
                else:
                    origin = st.module or ""
                targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in mods else origin for a in st.names]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is a few hundred modules deep at most
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_a_cycle_in(graph, comp) for comp in components]


def _a_cycle_in(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """The shortest path from the component's first module back to itself (breadth first)."""
    start, inside = comp[0], set(comp)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for u in frontier:
            for w in sorted(graph[u] & inside):
                if w == start:
                    path = [u]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came_from:
                    came_from[w] = u
                    following.append(w)
        frontier = following
    return comp  # not reached: a strongly connected component has a cycle through each member


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 100 and sum(map(len, graph.values())) > 300  # the graph was really read
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among deepfeat's modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_cycles(tmp_path):
    """A submodule importing its own package's __init__ (which re-exports it) is a cycle; the
    re-export alone, a lazy import and a TYPE_CHECKING import are not."""
    pkg = tmp_path / "deepfeat" / "part"
    pkg.mkdir(parents=True)
    (tmp_path / "deepfeat" / "__init__.py").write_text("")
    (tmp_path / "deepfeat" / "other.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .part import a\n"
        "def f():\n    from .part import a\n")
    (pkg / "__init__.py").write_text("from .a import A\nfrom .b import B\n")
    (pkg / "a.py").write_text("from .. import other\nA = 1\n")
    (pkg / "b.py").write_text("from . import a\nB = 2\n")
    assert find_cycles(import_graph(tmp_path)) == []
    (pkg / "b.py").write_text("from . import A\nB = 2\n")
    assert find_cycles(import_graph(tmp_path)) == [["deepfeat.part", "deepfeat.part.b", "deepfeat.part"]]


def test_no_function_is_too_long():
    long = []
    for path in sorted((SRC / "deepfeat").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
