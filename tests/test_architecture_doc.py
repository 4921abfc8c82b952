"""docs/architecture.md stays true: every module it names exists, its module map is the one
scripts/module_map.py makes from the code (so every module is in it), and its worked examples
(a new pooling, model source, index kind, ground-truth format, spec kind) run."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
SRC = REPO / "src"
TEXT = DOC.read_text(encoding="utf-8")

_NAME = re.compile(r"`(deepfeat(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")


def _module_path(dotted: str) -> Path | None:
    base = SRC.joinpath(*dotted.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _named() -> list[str]:
    return sorted(set(_NAME.findall(TEXT)))


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", TEXT, flags=re.DOTALL)


def _printed() -> list[str]:
    """What the doc says each example prints."""
    return re.findall(r"```python\n.*?```\n\nIt prints `([^`]*)`", TEXT, flags=re.DOTALL)


def test_every_name_in_the_doc_exists():
    names = _named()
    assert len(names) > 40
    for dotted in names:
        parts = dotted.split(".")
        # the longest prefix that is a module; what follows must be attributes of it
        for cut in range(len(parts), 0, -1):
            if _module_path(".".join(parts[:cut])) is not None:
                break
        else:
            pytest.fail(f"docs/architecture.md names {dotted}, which is no module of src/")
        if cut < len(parts):
            obj = importlib.import_module(".".join(parts[:cut]))
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"docs/architecture.md names {dotted}: {obj.__name__} has no {attr}"
                obj = getattr(obj, attr)


def test_the_module_map_is_current():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import module_map
    finally:
        sys.path.pop(0)
    assert module_map.module_map() in TEXT, (
        "the module map in docs/architecture.md is out of date: run python scripts/module_map.py --write")


def test_every_module_is_in_the_doc():
    named = set(_named())
    missing = []
    for p in sorted((SRC / "deepfeat").rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if dotted != "deepfeat" and not any(part.startswith("_") for part in dotted.split(".")) and dotted not in named:
            missing.append(dotted)
    assert not missing, f"docs/architecture.md does not say where these modules fit: {', '.join(missing)}"


HEADINGS = ("## Adding a pooling", "## Adding a model source", "## Adding an index kind",
            "## Adding a ground-truth format", "## Adding a spec kind")


def test_the_doc_has_the_worked_examples():
    for heading in HEADINGS:
        assert heading in TEXT
    assert len(_examples()) == len(HEADINGS)
    assert len(_printed()) == len(HEADINGS)


@pytest.mark.parametrize("i", range(len(HEADINGS)), ids=["pooling", "model-source", "index-kind", "ground-truth",
                                                   "spec-kind"])
def test_worked_example_runs(i, tmp_path):
    if i == 2:
        pytest.importorskip("faiss")
    code = _examples()[i]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    # a fresh interpreter: the examples register things, which must not leak into other tests
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"example {i} failed:\n{out.stdout}\n{out.stderr}"
    assert out.stdout.strip() == _printed()[i], "the example no longer prints what docs/architecture.md says"
