"""The spec parser: ``get_pooling("rmac:L=3+mac")`` -> a :class:`Pooling`.

Pooling specs follow the grammar of :mod:`deepfeat.specs` (parts joined by ``+``, bare
values in parameter order, ``windows=128/64`` a list); :data:`POOLING_SPECS` holds it.
"""

from __future__ import annotations

from deepfeat.errors import UsageError
from deepfeat.pooling.modules import ConcatPooling, Pooling
from deepfeat.pooling.mop_pooling import MOPPooling
from deepfeat.pooling.registry import POOLING_SPECS, POOLINGS
from deepfeat.specs import Part, register_spec_kind


def _part(text: str) -> Part:
    part = POOLING_SPECS.parse_part(text)
    if part.kind.name == "mop" and "input" in part.given and part.params["input"]:
        if "cell" in part.given:
            raise UsageError("pooling 'mop': give the layer stride as cell= or the input size as input=, not both")
        part.params["cell"] = None
    return part


def get_pooling(spec: str | Pooling) -> Pooling:
    """Parse a pooling spec (see :mod:`deepfeat.pooling`) into a :class:`Pooling`.

    Raises :class:`UsageError` naming the valid poolings or parameters on a bad spec.
    A :class:`Pooling` passed in is returned unchanged.
    """
    if isinstance(spec, Pooling):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty pooling spec; valid poolings: {', '.join(POOLINGS)}")
    parts = [_part(t) for t in POOLING_SPECS.split(spec)]
    if len(parts) == 1:
        kind, params = parts[0].kind, parts[0].params
        return MOPPooling(kind, params) if kind.needs_fit else Pooling(kind, params)
    members = []
    for part in parts:
        if part.kind.name in ("none", "mop"):
            raise UsageError(f"pooling {part.kind.name!r} cannot be part of a '+' concatenation ({spec!r})")
        members.append(Pooling(part.kind, part.params))
    return ConcatPooling(members)


register_spec_kind("pooling", POOLING_SPECS, lambda s: get_pooling(s).spec)
