"""What every Caffe layer module shares: shape and blob checks, ``*_param`` readers,
the :class:`CaffeLayer` mixin and the builder registry.

A builder reads one layer's prototxt definition, its input shapes and its
caffemodel blobs (or None) and returns the module; the family modules register
theirs with :func:`builder` (or by setting ``BUILDERS[type]``), and
:mod:`.registry` looks them up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from deepfeat.errors import FormatError, ModelError
from deepfeat.models.caffe.netdef import LayerDef
from deepfeat.models.caffe.prototxt import Message
from deepfeat.models.caffe.wire import Blob

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape) if len(shape) else "scalar"


def _canon_axis(ld: LayerDef, axis: int, ndim: int, what: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ModelError(f"{ld.label}: {what} {axis} is out of range for a {ndim}-D input")
    return axis % ndim


def _n_bottoms(ld: LayerDef, in_shapes: list[Shape], lo: int, hi: int | None = None) -> None:
    hi = lo if hi is None else hi
    n = len(in_shapes)
    if not lo <= n <= hi:
        want = str(lo) if lo == hi else (f"at least {lo}" if hi > 99 else f"{lo} to {hi}")
        raise ModelError(f"{ld.label}: takes {want} bottom blob(s), got {n}")


def _n_tops(ld: LayerDef, lo: int, hi: int | None = None) -> None:
    hi = lo if hi is None else hi
    if not lo <= len(ld.tops) <= hi:
        want = str(lo) if lo == hi else (f"at least {lo}" if hi > 99 else f"{lo} to {hi}")
        raise ModelError(f"{ld.label}: needs {want} top blob(s), got {len(ld.tops)}")


def _need_4d(ld: LayerDef, shape: Shape) -> None:
    if len(shape) != 4:
        raise ModelError(f"{ld.label}: needs a 4-D N x C x H x W input, its bottom '{ld.bottoms[0]}' is "
                         f"{len(shape)}-D ({_fmt(shape)})")


def take_blobs(ld: LayerDef, blobs: list[Blob] | None, expected: list[tuple[str, Shape]],
               why: str = "") -> list[np.ndarray] | None:
    """Check a layer's caffemodel blobs against the shapes the prototxt implies;
    return them as float32 arrays in those shapes (None when there are no weights)."""
    if blobs is None:
        return None
    if len(blobs) != len(expected):
        names = ", ".join(f"{n} {_fmt(s)}" for n, s in expected) or "none"
        raise ModelError(f"{ld.label}: the caffemodel has {len(blobs)} blob(s) for this layer but the prototxt "
                         f"implies {len(expected)} ({names}){'; ' + why if why else ''}")
    out = []
    for (label, shape), b in zip(expected, blobs):
        if not b.fits(shape):
            raise ModelError(f"{ld.label}: {label} blob in the caffemodel has shape {_fmt(b.shape)} but the "
                             f"prototxt implies {_fmt(shape)}{' (' + why + ')' if why else ''}; "
                             "the weights do not belong to this prototxt")
        out.append(np.array(b.data, dtype=np.float32).reshape(shape))
    return out


#: the largest weight array one layer may have: VGG's fc6 is 0.4 GB; a layer asking for more than this
#: is a typo or a hostile prototxt, refused before anything is allocated
MAX_LAYER_BYTES = 4 << 30


def check_weight_size(ld: LayerDef, shape: tuple[int, ...], why: str) -> None:
    """Refuse a weight array over :data:`MAX_LAYER_BYTES` (float32) before it is allocated."""
    n = int(np.prod([int(d) for d in shape], dtype=np.float64))
    if n * 4 > MAX_LAYER_BYTES:
        raise ModelError(f"{ld.label}: its weights would take {n * 4 / 2**30:,.0f} GiB ({why}); deepfeat refuses "
                         f"layers over {MAX_LAYER_BYTES >> 30} GiB (is num_output or kernel_size a typo?)")


def _construct(cls: type, *args, skip_init: bool = False, **kw) -> nn.Module:
    """``cls(*args, **kw)``; with *skip_init* (weights are about to be copied in) the
    parameters are allocated without their random initialisation (fc6 of VGG has
    100M values: initialising them costs seconds)."""
    if not skip_init:
        return cls(*args, **kw)
    with torch.device("meta"):
        m = cls(*args, **kw)
    m = m.to_empty(device="cpu")
    for name, buf in m.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.zero_()
    return m


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy().copy()


def _pair(ld: LayerDef, p: Message, base: str, default: int | None, required: bool = False) -> tuple[int, int]:
    """Caffe's ``kernel_size``/``pad``/``stride``/``dilation`` spellings for 2-D:
    ``x: 3`` (both), ``x: 3 x: 5`` (h, w), or ``x_h``/``x_w`` (both must be given)."""
    vals = p.ints(base)
    h_name, w_name = {"kernel_size": ("kernel_h", "kernel_w")}.get(base, (f"{base}_h", f"{base}_w"))
    has_hw = p.has(h_name) or p.has(w_name)
    if has_hw and base != "dilation":
        if not (p.has(h_name) and p.has(w_name)):
            raise FormatError(f"{ld.label}: give both {h_name} and {w_name}, or neither")
        if vals:
            raise FormatError(f"{ld.label}: give {base} or {h_name}/{w_name}, not both")
        h, w = p.int(h_name), p.int(w_name)
    elif len(vals) == 0:
        if required:
            raise FormatError(f"{ld.label}: {base} (or {h_name} and {w_name}) is required")
        h = w = default  # type: ignore[assignment]
    elif len(vals) == 1:
        h = w = vals[0]
    elif len(vals) == 2:
        h, w = vals
    else:
        raise ModelError(f"{ld.label}: {base} has {len(vals)} values; only 2-D (1 or 2 values) is supported")
    if h is None or w is None or h < 0 or w < 0:
        raise FormatError(f"{ld.label}: invalid {base} {h}x{w}")
    return int(h), int(w)


def _enum(ld: LayerDef, p: Message, name: str, values: dict[str, int], default: str) -> str:
    v = p.enum(name)
    if v is None:
        return default
    if isinstance(v, int):
        for k, n in values.items():
            if n == v:
                return k
    elif v in values:
        return str(v)
    raise FormatError(f"{ld.label}: {name} must be one of {', '.join(values)}, not {v}")


class CaffeLayer:
    """Mixin: what every Caffe layer module provides besides ``forward``."""

    caffe_type: str = ""

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        return [in_shapes[0]]

    def caffe_blobs(self) -> list[np.ndarray]:
        return []


# ---------------------------------------------------------------------------
# Builders: (layer, input shapes, blobs or None) -> module
# ---------------------------------------------------------------------------

Builder = Callable[[LayerDef, list[Shape], "list[Blob] | None"], nn.Module]
BUILDERS: dict[str, Builder] = {}


def builder(*types: str):
    def deco(fn: Builder) -> Builder:
        for t in types:
            BUILDERS[t] = fn
        return fn

    return deco


def _check_positive(ld: LayerDef, m: nn.Module, in_shapes: list[Shape]) -> None:
    out = m.out_shapes(in_shapes)  # type: ignore[attr-defined]
    for s in out:
        if any(d <= 0 for d in s):
            raise ModelError(f"{ld.label}: its input '{ld.bottoms[0]}' is {_fmt(in_shapes[0][1:])}, too small for "
                             f"this layer (output would be {_fmt(s[1:])}); use a larger input size")


def _simple(cls: type, param: str | None = None, fields: frozenset[str] = frozenset(), **defaults: float) -> Builder:
    def build(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
        _n_bottoms(ld, in_shapes, 1)
        _n_tops(ld, 1)
        take_blobs(ld, blobs, [])
        kw: dict[str, float] = {}
        if param is not None:
            p = ld.param(param, fields)
            kw = {k: p.float(k, v) for k, v in defaults.items()}
        return cls(**kw)

    return build

