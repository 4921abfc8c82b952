"""The spec parser: ``get_pooling("rmac:L=3+mac")`` -> a :class:`Pooling`; and the two entry points
that start from a spec: :func:`pool_multiscale` and :func:`load_pooling` (a saved MOP codebook).

Pooling specs follow the grammar of :mod:`deepfeat.specs` (parts joined by ``+``, bare
values in parameter order, ``windows=128/64`` a list); :data:`POOLING_SPECS` holds it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from deepfeat.errors import FormatError, UsageError
from deepfeat.pooling.modules import ConcatPooling, Pooling
from deepfeat.pooling.mop import VLADLevel
from deepfeat.pooling.mop_pooling import MOP_FILE_KIND, MOP_FORMAT_VERSION, MOPPooling
from deepfeat.pooling.multiscale import DEFAULT_SCALES, rescale
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


def pool_multiscale(features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, pooling: Pooling | str,
                    scales: Sequence[float] = DEFAULT_SCALES, mode: str = "sum", p: float = 3.0) -> torch.Tensor:
    """Run *features* (normalised batch -> activation map) on *x* rescaled by every
    scale and combine with ``pooling.multiscale``; the result is L2-normalised."""
    pooling = get_pooling(pooling)
    maps = [features(rescale(x, float(s))) for s in scales]
    return pooling.multiscale(maps, mode=mode, p=p)


def load_pooling(path: str | os.PathLike) -> MOPPooling:
    """Load a fitted MOP pooling saved with :meth:`MOPPooling.save`."""
    from deepfeat.postprocess.files import _read_npz

    arrays, meta = _read_npz(path, MOP_FILE_KIND)
    if int(meta.get("format_version", 0)) > MOP_FORMAT_VERSION:
        raise FormatError(f"{path}: MOP codebook format {meta.get('format_version')} is newer than this deepfeat")
    try:
        pooling = get_pooling(meta["spec"])
        level_meta = meta["levels"]
        pooling.fit_info = dict(meta["fit"])
    except KeyError as e:
        raise FormatError(f"{path}: MOP codebook meta lacks {e.args[0]!r}") from None
    if not isinstance(pooling, MOPPooling) or len(level_meta) != len(pooling.params["windows"]):
        raise FormatError(f"{path}: MOP codebook meta does not match its spec {meta.get('spec')!r}")
    pooling.levels = torch.nn.ModuleList(
        VLADLevel.from_arrays(arrays, f"level{i + 2}.", m) for i, m in enumerate(level_meta)
    )
    pooling.path = os.fspath(path)
    return pooling


register_spec_kind("pooling", POOLING_SPECS, lambda s: get_pooling(s).spec)
