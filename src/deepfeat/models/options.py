"""Parsing of model-spec options (``SPEC?key=value&...``), shared by the sources that take them."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import parse_qsl

from deepfeat.errors import UsageError


def parse_query(query: str, spec: str) -> dict[str, str]:
    """``a=1&b=x`` -> {"a": "1", "b": "x"}; a clear error for anything else."""
    if not query:
        return {}
    try:
        return dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise UsageError(f"options after '?' in {spec!r} must be key=value pairs joined by '&'") from None


def parse_size(v: Any, what: str) -> tuple[int, int]:
    """(H, W) from ``S``, ``HxW``, ``H,W``, an int or a pair."""
    try:
        if isinstance(v, str):
            vals = [int(p) for p in v.lower().replace(",", "x").split("x")]
        elif isinstance(v, int):
            vals = [v]
        else:
            vals = [int(p) for p in v]
        if len(vals) == 1:
            vals = vals * 2
        if len(vals) != 2 or min(vals) <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a positive size S or HxW, not {v!r}") from None
    return vals[0], vals[1]


def parse_number(v: Any, what: str, positive: bool = False) -> float:
    """A finite float from a number or a string, which may be a fraction ``a/b`` (``1/255``)."""
    try:
        if isinstance(v, str) and "/" in v:
            num, den = v.split("/", 1)
            f = float(num) / float(den)
        else:
            f = float(v)
    except (TypeError, ValueError, ZeroDivisionError):
        raise UsageError(f"{what} must be a number (or a fraction such as 1/255), not {v!r}") from None
    if not math.isfinite(f):
        raise UsageError(f"{what} must be finite, not {v!r}")
    if positive and f <= 0:
        raise UsageError(f"{what} must be positive, not {v!r}")
    return f
