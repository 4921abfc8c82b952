"""The spec parser: ``get_pooling("rmac:L=3+mac")`` -> a :class:`Pooling`."""

from __future__ import annotations

import math
import re
from typing import Any

from deepfeat.errors import UsageError, suggest
from deepfeat.pooling.modules import ConcatPooling, Pooling
from deepfeat.pooling.mop_pooling import MOPPooling
from deepfeat.pooling.registry import _ALIASES, POOLINGS, Param, PoolingKind


def _parse_value(kind: PoolingKind, p: Param, text: str) -> Any:
    bad = UsageError(f"pooling {kind.name!r}: {p.name} must be {p.rule}, got {text!r}")
    t = text.strip()
    try:
        if p.kind == "float":
            v: Any = float(t)
            if not math.isfinite(v):
                raise bad
        elif p.kind == "int":
            fv = float(t)
            if not fv.is_integer():
                raise bad
            v = int(fv)
        elif p.kind == "bool":
            low = t.lower()
            if low in ("1", "true", "yes", "on"):
                v = True
            elif low in ("0", "false", "no", "off"):
                v = False
            else:
                raise bad
        elif p.kind == "ints":
            v = tuple(int(s) for s in t.split("/"))
        else:
            if t.lower() not in p.choices:
                raise bad
            v = t.lower()
    except ValueError:
        raise bad from None
    if not p.check(v):
        raise bad
    return v


_SPLIT_PARTS = re.compile(r"\+(?=\s*[A-Za-z])")


def _parse_part(text: str) -> tuple[PoolingKind, dict[str, Any], set[str]]:
    raw = text.strip()
    name, sep, argstr = raw.partition(":")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in POOLINGS:
        raise UsageError(
            f"unknown pooling {name.strip()!r}; valid poolings: {', '.join(POOLINGS)}.{suggest(key, POOLINGS)}"
        )
    kind = POOLINGS[key]
    params = {p.name: p.default for p in kind.params}
    given: set[str] = set()
    if sep and argstr.strip():
        if not kind.params:
            raise UsageError(f"pooling {kind.name!r} takes no parameters, got {raw!r}")
        by_name = {p.name.lower(): p for p in kind.params}
        order = [p for p in kind.params if p.shown]
        positional_ok = True
        for i, arg in enumerate(a.strip() for a in argstr.split(",")):
            if not arg:
                raise UsageError(f"pooling spec {raw!r} has an empty parameter")
            if "=" in arg:
                k, _, v = arg.partition("=")
                p = by_name.get(k.strip().lower())
                if p is None:
                    raise UsageError(
                        f"pooling {kind.name!r} has no parameter {k.strip()!r}; its parameters are: "
                        f"{', '.join(q.name for q in kind.params)}"
                    )
                positional_ok = False
            else:
                if not positional_ok or i >= len(order):
                    raise UsageError(
                        f"pooling spec {raw!r}: write parameters as name=value "
                        f"({', '.join(q.name for q in kind.params)}), e.g. {kind.syntax}"
                    )
                p, v = order[i], arg
            if p.name in given:
                raise UsageError(f"pooling spec {raw!r} sets {p.name} twice")
            params[p.name] = _parse_value(kind, p, v)
            given.add(p.name)
    if kind.name == "mop" and "input" in given and params["input"]:
        if "cell" in given:
            raise UsageError("pooling 'mop': give the layer stride as cell= or the input size as input=, not both")
        params["cell"] = None
    return kind, params, given



def get_pooling(spec: str | Pooling) -> Pooling:
    """Parse a pooling spec (see :mod:`deepfeat.pooling`) into a :class:`Pooling`.

    Raises :class:`UsageError` naming the valid poolings or parameters on a bad spec.
    A :class:`Pooling` passed in is returned unchanged.
    """
    if isinstance(spec, Pooling):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty pooling spec; valid poolings: {', '.join(POOLINGS)}")
    parts = [p for p in _SPLIT_PARTS.split(spec.strip())]
    if len(parts) == 1:
        kind, params, _ = _parse_part(parts[0])
        return MOPPooling(kind, params) if kind.needs_fit else Pooling(kind, params)
    members = []
    for part in parts:
        kind, params, _ = _parse_part(part)
        if kind.name in ("none", "mop"):
            raise UsageError(f"pooling {kind.name!r} cannot be part of a '+' concatenation ({spec!r})")
        members.append(Pooling(kind, params))
    return ConcatPooling(members)
