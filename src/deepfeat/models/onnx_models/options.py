"""The ``onnx:PATH?key=val&...`` spec and the values of its options (see
:mod:`deepfeat.models.onnx_models` for what each option means)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from deepfeat.errors import UsageError
from deepfeat.models.options import parse_number, parse_query

OPTIONS = ("input_size", "mean", "std", "scale", "channel_order", "layout", "interpolation", "crop_pct", "resize",
           "output", "output_kind", "labels", "tap_layout", "threads")


TAP_LAYOUTS = ("auto", "NCHW", "NHWC")
DEFAULT_SIZE = (224, 224)
DEFAULT_INTERPOLATION = "bilinear"
DEFAULT_CROP_PCT = 0.875


def split_onnx_spec(rest: str, spec: str) -> tuple[str, dict[str, str]]:
    """``PATH.onnx?k=v&...`` -> (path, options).

    The path ends at the first '?' that leaves an existing file before it (so paths
    may contain '?'), failing that at the first '?'.
    """
    rest = rest.strip()
    if os.path.isfile(rest) or "?" not in rest:
        path, query = rest, ""
    else:
        marks = [i for i, ch in enumerate(rest) if ch == "?"]
        at = next((i for i in marks if os.path.isfile(rest[:i])), marks[0])
        path, query = rest[:at], rest[at + 1:]
    if not path:
        raise UsageError(f"model spec {spec!r} names no file; e.g. onnx:model.onnx?mean=0.5&std=0.5")
    opts = parse_query(query, spec)
    return path, opts


def _values(v: Any, channels: int, what: str, none_value: float) -> tuple[float, ...]:
    """1 or *channels* numbers from ``"0.5"``, ``"0.485,0.456,0.406"``, a sequence, or ``none``."""
    if isinstance(v, str):
        s = v.strip()
        if s.lower() == "none":
            return (none_value,) * channels
        parts = [p for p in s.replace(";", ",").split(",") if p.strip()]
    elif isinstance(v, (int, float)):
        parts = [v]
    else:
        try:
            parts = list(v)
        except TypeError:
            raise UsageError(f"{what} must be 1 or {channels} numbers, not {v!r}") from None
    vals = [parse_number(p, what) for p in parts]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise UsageError(f"{what}: {len(vals)} values for a {channels}-channel input (give 1 or {channels})")
    return tuple(vals)


def _choice(v: Any, what: str, choices: Sequence[str], upper: bool = True) -> str:
    s = str(v).strip()
    s = s.upper() if upper else s.lower()
    if s not in choices:
        raise UsageError(f"{what} {v!r} unknown; choose from {', '.join(choices)}")
    return s
