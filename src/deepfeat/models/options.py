"""Model-spec options (``SPEC?key=value&...``), shared by the sources that take them: the
query variant of the grammar of :mod:`deepfeat.specs`, with its number rule (fractions
such as ``1/255`` allowed)."""

from __future__ import annotations

from typing import Any

from deepfeat.errors import UsageError
from deepfeat.specs import canonical_query, parse_number, parse_query, register_spec_kind

__all__ = ["parse_number", "parse_query", "parse_size"]


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


register_spec_kind("model-options", None, lambda s: canonical_query(parse_query(s, s)))
