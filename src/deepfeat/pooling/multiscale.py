"""Multi-scale: combine per-scale vectors, rescale a batch, and pool a feature
extractor's maps at several scales (scale lists: :func:`deepfeat.specs.parse_scales`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deepfeat.errors import UsageError
from deepfeat.pooling.common import EPS
from deepfeat.specs import parse_scales  # noqa: F401  (public as deepfeat.pooling.parse_scales)

DEFAULT_SCALES = (1.0, 2**-0.5, 0.5)
COMBINE_MODES = ("sum", "gem")


def combine_scales(vectors: Sequence[torch.Tensor], mode: str = "sum", p: float = 3.0,
                   eps: float = EPS) -> torch.Tensor:
    """Combine ``N x D`` vectors pooled at several scales into one ``N x D``.

    ``sum``: their sum. ``gem``: the generalised mean ``(mean_s v_s^p)^(1/p)`` with
    values clamped at *eps* (cirtorch's multi-scale ``msp``; p=1 is the mean).
    Nothing is normalised here; see :meth:`Pooling.multiscale` for the per-method rule.
    """
    if not vectors:
        raise UsageError("combine_scales needs at least one vector")
    if mode not in COMBINE_MODES:
        raise UsageError(f"scale combination {mode!r} unknown; choose from {', '.join(COMBINE_MODES)}")
    shape = tuple(vectors[0].shape)
    for v in vectors:
        if tuple(v.shape) != shape:
            raise UsageError(f"cannot combine scales with different shapes: {shape} and {tuple(v.shape)}")
    if mode == "sum":
        out = vectors[0]
        for v in vectors[1:]:
            out = out + v
        return out
    if not p > 0:
        raise UsageError(f"generalised-mean power p must be > 0, got {p}")
    acc = vectors[0].clamp(min=eps).pow(p)
    for v in vectors[1:]:
        acc = acc + v.clamp(min=eps).pow(p)
    return (acc / len(vectors)).pow(1.0 / p)


def rescale(x: torch.Tensor, scale: float, multiple: int = 1) -> torch.Tensor:
    """Resize a normalised ``N x C x H x W`` batch by *scale* (bilinear, as cirtorch); with *multiple*
    > 1 (a transformer's patch stride) each side is rounded to a multiple of it."""
    if scale == 1:
        return x
    if multiple > 1:
        h, w = (max(multiple, round(d * scale / multiple) * multiple) for d in x.shape[-2:])
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
