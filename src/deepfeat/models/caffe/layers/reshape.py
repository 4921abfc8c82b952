"""Layers that move values between blobs without computing on them, or combine
blobs element-wise: Input, Top, Split, Silence (routing); Flatten, Reshape (shape);
Concat, Slice, Crop, Tile (concatenating and slicing); Eltwise (PROD / SUM / MAX).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from deepfeat.errors import FormatError, ModelError
from deepfeat.models.caffe.layers.base import (
    CaffeLayer,
    Shape,
    _canon_axis,
    _enum,
    _fmt,
    _n_bottoms,
    _n_tops,
    builder,
    take_blobs,
)
from deepfeat.models.caffe.netdef import LayerDef
from deepfeat.models.caffe.wire import Blob


class Input(CaffeLayer, nn.Identity):
    """A net input (an ``Input`` layer or an ``input:`` declaration); passes the batch on."""

    caffe_type = "Input"

    def __init__(self, blob: str, shape: Shape | None, layer: str | None = None):
        super().__init__()
        self.blob, self.shape, self.layer = blob, shape, layer


class Top(nn.Identity):
    """The second, third... output of a multi-top layer (Slice), so each can be tapped."""

    def __init__(self, blob: str):
        super().__init__()
        self.blob = blob


class Flatten(CaffeLayer, nn.Flatten):
    caffe_type = "Flatten"

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        s = in_shapes[0]
        a, b = self.start_dim % len(s), self.end_dim % len(s)
        return [s[:a] + (int(np.prod(s[a:b + 1])),) + s[b + 1:]]


def reshape_shape(in_shape: Sequence[int], dims: Sequence[int], axis: int, num_axes: int,
                  label: str = "Reshape") -> tuple[int, ...]:
    """Caffe ``ReshapeLayer::Reshape``: 0 copies an input dim, one -1 is inferred."""
    nd = len(in_shape)
    start = axis if axis >= 0 else nd + axis + 1
    if not 0 <= start <= nd:
        raise ModelError(f"{label}: axis {axis} out of range for a {nd}-D input")
    end = nd if num_axes == -1 else start + num_axes
    if num_axes < -1 or end > nd:
        raise ModelError(f"{label}: num_axes {num_axes} out of range for a {nd}-D input from axis {start}")
    out = list(in_shape[:start]) + list(dims) + list(in_shape[end:])
    infer = [i for i, d in enumerate(dims) if d == -1]
    if len(infer) > 1:
        raise ModelError(f"{label}: at most one dimension may be -1, got {list(dims)}")
    for i, d in enumerate(dims):
        if d == 0:
            if start + i >= nd:
                raise ModelError(f"{label}: dim {i} is 0 (copy) but the input has no axis {start + i}")
            out[start + i] = in_shape[start + i]
        elif d < -1:
            raise ModelError(f"{label}: invalid dimension {d}")
    total = int(np.prod(in_shape)) if nd else 1
    if infer:
        known = int(np.prod([d for j, d in enumerate(out) if j != start + infer[0]]))
        if known == 0 or total % known:
            raise ModelError(f"{label}: cannot reshape {_fmt(in_shape)} to {list(dims)}")
        out[start + infer[0]] = total // known
    if int(np.prod(out)) != total:
        raise ModelError(f"{label}: cannot reshape {_fmt(in_shape)} ({total} values) to {_fmt(out)}")
    return tuple(int(v) for v in out)


class Reshape(CaffeLayer, nn.Module):
    caffe_type = "Reshape"

    def __init__(self, dims: Sequence[int], axis: int = 0, num_axes: int = -1, name: str = "Reshape"):
        super().__init__()
        self.dims, self.axis, self.num_axes, self.label = list(dims), axis, num_axes, name

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        return [reshape_shape(in_shapes[0], self.dims, self.axis, self.num_axes, self.label)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(reshape_shape(tuple(x.shape), self.dims, self.axis, self.num_axes, self.label))

    def extra_repr(self) -> str:
        return f"dims={self.dims}, axis={self.axis}, num_axes={self.num_axes}"


class Concat(CaffeLayer, nn.Module):
    caffe_type = "Concat"

    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = axis

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        a = self.axis % len(in_shapes[0])
        out = list(in_shapes[0])
        out[a] = sum(s[a] for s in in_shapes)
        return [tuple(out)]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return xs[0] if len(xs) == 1 else torch.cat(xs, dim=self.axis)


class Eltwise(CaffeLayer, nn.Module):
    """Element-wise PROD, SUM (with optional per-bottom coefficients) or MAX."""

    caffe_type = "Eltwise"

    def __init__(self, operation: str = "SUM", coeffs: Sequence[float] = ()):
        super().__init__()
        self.operation, self.coeffs = operation, list(coeffs)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.operation == "SUM":
            if self.coeffs:
                y = xs[0] * self.coeffs[0]
                for c, x in zip(self.coeffs[1:], xs[1:]):
                    y = y + x * c
                return y
            y = xs[0]
            for x in xs[1:]:
                y = y + x
            return y
        y = xs[0]
        for x in xs[1:]:
            y = y * x if self.operation == "PROD" else torch.maximum(y, x)
        return y

    def extra_repr(self) -> str:
        return f"operation={self.operation}" + (f", coeffs={self.coeffs}" if self.coeffs else "")


class Split(CaffeLayer, nn.Module):
    """Every top is the bottom (Caffe inserts these where a blob feeds several layers)."""

    caffe_type = "Split"

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        return [in_shapes[0]] * self.n

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (x,) * self.n


class Slice(CaffeLayer, nn.Module):
    caffe_type = "Slice"

    def __init__(self, axis: int, points: Sequence[int], n: int, name: str = "Slice"):
        super().__init__()
        self.axis, self.points, self.n, self.label = axis, list(points), n, name

    def sizes(self, dim: int) -> list[int]:
        if self.points:
            edges = [0, *self.points, dim]
            if any(b <= a for a, b in itertools.pairwise(edges)):
                raise ModelError(f"{self.label}: slice points {self.points} do not fit an axis of size {dim}")
            return [b - a for a, b in itertools.pairwise(edges)]
        if dim % self.n:
            raise ModelError(f"{self.label}: an axis of size {dim} cannot be sliced into {self.n} equal parts")
        return [dim // self.n] * self.n

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        s = in_shapes[0]
        a = self.axis % len(s)
        return [s[:a] + (k,) + s[a + 1:] for k in self.sizes(s[a])]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.split(x, self.sizes(x.shape[self.axis]), dim=self.axis))


class Crop(CaffeLayer, nn.Module):
    """Crop bottom 0 to the shape of bottom 1 from ``axis`` on, at ``offset``."""

    caffe_type = "Crop"

    def __init__(self, axis: int = 2, offsets: Sequence[int] = ()):
        super().__init__()
        self.axis, self.offsets = axis, list(offsets)

    def _offsets(self, nd: int) -> list[int]:
        a = self.axis % nd
        n = nd - a
        if not self.offsets:
            return [0] * n
        return self.offsets * n if len(self.offsets) == 1 else list(self.offsets)

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        a_shape, b_shape = in_shapes
        a = self.axis % len(a_shape)
        return [tuple(a_shape[:a]) + tuple(b_shape[a:])]

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        a = self.axis % x.dim()
        for i, off in enumerate(self._offsets(x.dim())):
            x = x.narrow(a + i, off, ref.shape[a + i])
        return x


class Tile(CaffeLayer, nn.Module):
    caffe_type = "Tile"

    def __init__(self, axis: int = 1, tiles: int = 1):
        super().__init__()
        self.axis, self.tiles = axis, tiles

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        s = list(in_shapes[0])
        s[self.axis % len(s)] *= self.tiles
        return [tuple(s)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reps = [1] * x.dim()
        reps[self.axis % x.dim()] = self.tiles
        return x.repeat(*reps)


class Silence(CaffeLayer, nn.Module):
    """Consumes its bottoms, produces nothing."""

    caffe_type = "Silence"

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        return []

    def forward(self, *xs: torch.Tensor) -> None:
        return None


# ---------------------------------------------------------------------------
# Builders: (layer, input shapes, blobs or None) -> module
# ---------------------------------------------------------------------------


@builder("Eltwise")
def _build_eltwise(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 2, 1 << 30)
    _n_tops(ld, 1)
    p = ld.param("eltwise_param", frozenset({"operation", "coeff", "stable_prod_grad"}))
    op = _enum(ld, p, "operation", {"PROD": 0, "SUM": 1, "MAX": 2}, "SUM")
    coeffs = p.floats("coeff")
    if coeffs and op != "SUM":
        raise FormatError(f"{ld.label}: Eltwise coefficients apply only to SUM, not {op}")
    if coeffs and len(coeffs) != len(in_shapes):
        raise FormatError(f"{ld.label}: {len(coeffs)} coefficients for {len(in_shapes)} bottoms "
                          "(give one per bottom)")
    for b, s in zip(ld.bottoms[1:], in_shapes[1:]):
        if tuple(s) != tuple(in_shapes[0]):
            raise ModelError(f"{ld.label}: bottom '{b}' is {_fmt(s)} but '{ld.bottoms[0]}' is "
                             f"{_fmt(in_shapes[0])}; Eltwise needs equal shapes")
    take_blobs(ld, blobs, [])
    return Eltwise(op, coeffs)


@builder("Concat")
def _build_concat(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1, 1 << 30)
    _n_tops(ld, 1)
    p = ld.param("concat_param", frozenset({"axis", "concat_dim"}))
    if p.has("axis") and p.has("concat_dim"):
        raise FormatError(f"{ld.label}: give concat_param axis or concat_dim, not both")
    nd = len(in_shapes[0])
    axis = _canon_axis(ld, p.int("axis", p.int("concat_dim", 1)), nd)
    for b, s in zip(ld.bottoms[1:], in_shapes[1:]):
        if len(s) != nd or any(x != y for i, (x, y) in enumerate(zip(s, in_shapes[0])) if i != axis):
            raise ModelError(f"{ld.label}: bottom '{b}' is {_fmt(s)}, which cannot be concatenated with "
                             f"'{ld.bottoms[0]}' ({_fmt(in_shapes[0])}) along axis {axis}")
    take_blobs(ld, blobs, [])
    return Concat(axis)


@builder("Flatten")
def _build_flatten(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("flatten_param", frozenset({"axis", "end_axis"}))
    nd = len(in_shapes[0])
    a = _canon_axis(ld, p.int("axis", 1), nd)
    e = _canon_axis(ld, p.int("end_axis", -1), nd, "end_axis")
    if e < a:
        raise FormatError(f"{ld.label}: end_axis {e} is before axis {a}")
    take_blobs(ld, blobs, [])
    return Flatten(a, e)


@builder("Reshape")
def _build_reshape(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("reshape_param", frozenset({"shape", "axis", "num_axes"}))
    dims = p.msg("shape").ints("dim")
    take_blobs(ld, blobs, [])
    m = Reshape(dims, p.int("axis", 0), p.int("num_axes", -1), f"layer '{ld.name}' (Reshape)")
    m.out_shapes(in_shapes)  # validates now, with the layer named
    return m


@builder("Split")
def _build_split(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1, 1 << 30)
    take_blobs(ld, blobs, [])
    return Split(len(ld.tops))


@builder("Slice")
def _build_slice(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1, 1 << 30)
    p = ld.param("slice_param", frozenset({"axis", "slice_point", "slice_dim"}))
    if p.has("axis") and p.has("slice_dim"):
        raise FormatError(f"{ld.label}: give slice_param axis or slice_dim, not both")
    axis = _canon_axis(ld, p.int("axis", p.int("slice_dim", 1)), len(in_shapes[0]))
    points = p.ints("slice_point")
    if points and len(points) != len(ld.tops) - 1:
        raise FormatError(f"{ld.label}: {len(points)} slice points for {len(ld.tops)} tops (need one fewer)")
    take_blobs(ld, blobs, [])
    m = Slice(axis, points, len(ld.tops), f"layer '{ld.name}' (Slice)")
    m.out_shapes(in_shapes)
    return m


@builder("Crop")
def _build_crop(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 2)
    _n_tops(ld, 1)
    p = ld.param("crop_param", frozenset({"axis", "offset"}))
    a_shape, b_shape = in_shapes
    if len(a_shape) != len(b_shape):
        raise ModelError(f"{ld.label}: bottoms have different numbers of axes")
    axis = _canon_axis(ld, p.int("axis", 2), len(a_shape))
    offsets = p.ints("offset")
    n = len(a_shape) - axis
    if offsets and len(offsets) not in (1, n):
        raise FormatError(f"{ld.label}: give one offset, or one per cropped axis ({n})")
    m = Crop(axis, offsets)
    for i, off in enumerate(m._offsets(len(a_shape))):
        if a_shape[axis + i] < b_shape[axis + i] + off:
            raise ModelError(f"{ld.label}: cannot crop {_fmt(a_shape)} to {_fmt(b_shape)} at offset {off}")
    take_blobs(ld, blobs, [])
    return m


@builder("Tile")
def _build_tile(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("tile_param", frozenset({"axis", "tiles"}))
    tiles = p.int("tiles", 0)
    if tiles < 1:
        raise FormatError(f"{ld.label}: tile_param.tiles must be at least 1")
    take_blobs(ld, blobs, [])
    return Tile(_canon_axis(ld, p.int("axis", 1), len(in_shapes[0])), tiles)


@builder("Silence")
def _build_silence(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1, 1 << 30)
    _n_tops(ld, 0)
    take_blobs(ld, blobs, [])
    return Silence()

