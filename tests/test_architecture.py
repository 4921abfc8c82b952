"""The shape of the code (issue 25): packages layered by stage with no import cycles, enforced by
import-linter's contracts in pyproject.toml (``[tool.importlinter]``), and no module or function too
long to read at once.

import-linter (on grimp's import graph) sees every import statement: at module level, inside
functions (lazy on purpose) and under ``if TYPE_CHECKING:``; an import cycle hidden by laziness is
still a cycle. The ``acyclic_siblings`` contract forbids cycles between the modules or subpackages
of any package; the module-level check below adds the one it cannot see, a submodule importing its
own package's ``__init__`` that imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

#: the guards; the aims (issues 18 and 25) are about 80 lines a function, 400 a module
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 420


def lint_imports(config: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], cwd=root,
                          env={"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    res = lint_imports(REPO / "pyproject.toml", REPO)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


CONFIG = """
[tool.importlinter]
root_package = "pkg"
exclude_type_checking_imports = false

[[tool.importlinter.contracts]]
id = "layers"
name = "layers"
type = "layers"
containers = ["pkg"]
layers = ["high", "low"]

[[tool.importlinter.contracts]]
id = "acyclic"
name = "acyclic"
type = "acyclic_siblings"
ancestors = ["pkg"]
"""


@pytest.mark.parametrize("statement", [
    "from pkg.high import a",                                   # at import time
    "def f():\n    from pkg.high import a",                     # lazy, inside a function
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import a",
])
def test_the_contracts_see_every_kind_of_import(tmp_path, statement):
    """An upward import breaks the layers however it is written; the same file without it passes."""
    pkg = tmp_path / "src" / "pkg"
    for sub in ("high", "low"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "high" / "a.py").write_text("from pkg.low import b\n")
    (pkg / "low" / "b.py").write_text("X = 1\n")
    (tmp_path / "pyproject.toml").write_text(CONFIG)
    assert lint_imports(tmp_path / "pyproject.toml", tmp_path).returncode == 0
    (pkg / "low" / "b.py").write_text(statement + "\nX = 1\n")
    res = lint_imports(tmp_path / "pyproject.toml", tmp_path)
    assert res.returncode != 0 and "pkg.low.b -> pkg.high.a" in res.stdout, res.stdout


def module_cycles(package: str = "deepfeat") -> list[list[str]]:
    """Strongly connected components of more than one module in the whole import graph (every
    import, lazy and TYPE_CHECKING ones included; a package is its ``__init__``)."""
    graph = grimp.build_graph(package, cache_dir=None)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def test_no_module_cycles():
    cycles = module_cycles()
    assert not cycles, "import cycles among deepfeat's modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_module_cycle_check_finds_a_submodule_importing_its_package(tmp_path, monkeypatch):
    pkg = tmp_path / "cyc" / "part"
    pkg.mkdir(parents=True)
    (tmp_path / "cyc" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from cyc.part.a import A\n")
    (pkg / "a.py").write_text("A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module_cycles("cyc") == []
    (pkg / "a.py").write_text("def f():\n    from cyc.part import A\nA = 1\n")
    assert module_cycles("cyc") == [["cyc.part", "cyc.part.a"]]


def test_no_module_is_too_long():
    long = [f"{p.relative_to(SRC)}: {n} lines" for p in sorted((SRC / "deepfeat").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long)


def test_no_function_is_too_long():
    long = []
    for path in sorted((SRC / "deepfeat").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)
