"""Argument helpers shared by several commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from deepfeat.models.default import DEFAULT_MODEL


def add_model_args(p: argparse.ArgumentParser, device: bool = True, labels: bool = False) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, metavar="SPEC",
                   help=f"model spec (default {DEFAULT_MODEL}); see `deepfeat models`")
    if device:
        p.add_argument("--device", default="auto", metavar="auto|cpu|cuda", help="where to run (default auto)")
    if labels:
        p.add_argument("--labels", metavar="FILE", help="class names, one per line (synset_words.txt works)")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def format_table(rows: list[list[Any]], headers: list[str], align: str | None = None) -> str:
    """A plain-text table; *align* is a string of 'l'/'r' per column."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    align = align or "l" * len(headers)

    def fmt(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)).rstrip()

    lines = [fmt(list(headers)), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)
