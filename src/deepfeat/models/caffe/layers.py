"""Caffe layers as PyTorch modules, with Caffe's semantics to the last detail.

Each layer type has a builder that reads its ``*_param`` block (unknown fields are
refused, as Caffe's parser would), infers the output shapes from the input shapes
the way Caffe's ``Reshape`` does, and checks the caffemodel's blobs against the
shapes the prototxt implies (with Caffe's legacy 4-D shape rule). Module classes
subclass their torch counterparts where the semantics agree (``Convolution`` is an
``nn.Conv2d``, ``InnerProduct`` an ``nn.Linear``, ``ReLU`` an ``nn.ReLU``...), so
generic tooling recognises them; the Caffe details live in their ``forward``:

* pooling uses Caffe's output size (``ceil`` rounding, then dropping a last window
  that would start in the padding) and, for AVE, divides by the window size clipped
  to the padded input, not to the image (``count_include_pad`` semantics);
* LRN across channels is ``x / (k + alpha/n * sum x^2)^beta``; within a channel it
  is ``x / (1 + alpha/n^2 * sum x^2)^beta`` over an n x n zero-padded window (Caffe
  hard-codes the 1 there and ignores ``k``);
* BatchNorm divides the stored mean and variance by the moving-average factor
  (the third blob), or uses batch statistics if ``use_global_stats: false``;
* Dropout is the identity at test time (times ``1 - ratio`` if ``scale_train: false``).

Every module has ``caffe_blobs()``, the inverse of loading: its parameters in
Caffe's layout, so a net can be written back as a ``.caffemodel``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import FormatError, ModelError
from .netdef import LayerDef
from .prototxt import Message
from .wire import Blob

Shape = tuple[int, ...]

#: Layer types that only make sense when training (data sources, losses, metrics).
TRAINING_TYPES = frozenset({
    "Data", "ImageData", "HDF5Data", "HDF5Output", "MemoryData", "WindowData", "DummyData", "AnnotatedData",
    "VideoData", "SoftmaxWithLoss", "EuclideanLoss", "HingeLoss", "InfogainLoss", "MultinomialLogisticLoss",
    "SigmoidCrossEntropyLoss", "ContrastiveLoss", "Accuracy", "MultiBoxLoss",
})


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
# Layers without parameters
# ---------------------------------------------------------------------------


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


class ReLU(CaffeLayer, nn.ReLU):
    caffe_type = "ReLU"


class LeakyReLU(CaffeLayer, nn.LeakyReLU):
    """Caffe ``ReLU`` with ``negative_slope``."""

    caffe_type = "ReLU"


class Sigmoid(CaffeLayer, nn.Sigmoid):
    caffe_type = "Sigmoid"


class TanH(CaffeLayer, nn.Tanh):
    caffe_type = "TanH"


class ELU(CaffeLayer, nn.ELU):
    caffe_type = "ELU"


class AbsVal(CaffeLayer, nn.Module):
    caffe_type = "AbsVal"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


class BNLL(CaffeLayer, nn.Module):
    """``log(1 + exp(x))``, computed stably."""

    caffe_type = "BNLL"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


class Power(CaffeLayer, nn.Module):
    """``(shift + scale * x) ^ power``."""

    caffe_type = "Power"

    def __init__(self, power: float = 1.0, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.power, self.scale, self.shift = power, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * self.scale + self.shift if (self.scale != 1.0 or self.shift != 0.0) else x
        return y if self.power == 1.0 else y.pow(self.power)

    def extra_repr(self) -> str:
        return f"power={self.power}, scale={self.scale}, shift={self.shift}"


class Exp(CaffeLayer, nn.Module):
    """``base ^ (shift + scale * x)`` (``base = e`` by default)."""

    caffe_type = "Exp"

    def __init__(self, base: float = -1.0, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.base, self.scale, self.shift = base, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln_base = 1.0 if self.base == -1.0 else math.log(self.base)
        return torch.exp((self.shift + self.scale * x) * ln_base)


class Log(CaffeLayer, nn.Module):
    """``log_base(shift + scale * x)`` (natural log by default)."""

    caffe_type = "Log"

    def __init__(self, base: float = -1.0, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        self.base, self.scale, self.shift = base, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.log(self.shift + self.scale * x)
        return y if self.base == -1.0 else y / math.log(self.base)


class Threshold(CaffeLayer, nn.Module):
    """1 where ``x > threshold``, else 0."""

    caffe_type = "Threshold"

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)


class Dropout(CaffeLayer, nn.Dropout):
    """Identity at test time (Caffe scales during training), or ``x * (1 - ratio)``
    when ``scale_train: false``; real dropout only if the module is put in train mode."""

    caffe_type = "Dropout"

    def __init__(self, ratio: float = 0.5, scale_train: bool = True):
        super().__init__(p=ratio)
        self.scale_train = scale_train

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            y = F.dropout(x, self.p, True)
            return y if self.scale_train else y * (1.0 - self.p)
        return x if self.scale_train else x * (1.0 - self.p)


class Softmax(CaffeLayer, nn.Softmax):
    caffe_type = "Softmax"


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


class MVN(CaffeLayer, nn.Module):
    """Mean (and variance) normalisation per channel, or across channels."""

    caffe_type = "MVN"

    def __init__(self, normalize_variance: bool = True, across_channels: bool = False, eps: float = 1e-9):
        super().__init__()
        self.normalize_variance, self.across_channels, self.eps = normalize_variance, across_channels, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1 if self.across_channels else 2, x.dim()))
        if not dims:
            return x - x if not self.normalize_variance else torch.zeros_like(x)
        y = x - x.mean(dim=dims, keepdim=True)
        if self.normalize_variance:
            y = y / (y.pow(2).mean(dim=dims, keepdim=True).sqrt() + self.eps)
        return y


class Silence(CaffeLayer, nn.Module):
    """Consumes its bottoms, produces nothing."""

    caffe_type = "Silence"

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        return []

    def forward(self, *xs: torch.Tensor) -> None:
        return None


# ---------------------------------------------------------------------------
# Spatial layers
# ---------------------------------------------------------------------------


def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def pool_out(size: int, k: int, s: int, p: int) -> int:
    """Caffe's pooled size: ceil rounding, minus a last window starting in the padding."""
    out = math.ceil((size + 2 * p - k) / s) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    return out


class Convolution(CaffeLayer, nn.Conv2d):
    caffe_type = "Convolution"

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        n, _, h, w = in_shapes[0]
        oh = conv_out(h, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0])  # type: ignore[index]
        ow = conv_out(w, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1])  # type: ignore[index]
        return [(n, self.out_channels, oh, ow)]

    def caffe_blobs(self) -> list[np.ndarray]:
        return [_np(self.weight)] + ([_np(self.bias)] if self.bias is not None else [])


class Deconvolution(CaffeLayer, nn.ConvTranspose2d):
    caffe_type = "Deconvolution"

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        n, _, h, w = in_shapes[0]
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        oh = s[0] * (h - 1) + d[0] * (k[0] - 1) + 1 - 2 * p[0]  # type: ignore[index]
        ow = s[1] * (w - 1) + d[1] * (k[1] - 1) + 1 - 2 * p[1]  # type: ignore[index]
        return [(n, self.out_channels, oh, ow)]

    def caffe_blobs(self) -> list[np.ndarray]:
        return [_np(self.weight)] + ([_np(self.bias)] if self.bias is not None else [])


class Pooling(CaffeLayer, nn.Module):
    """MAX / AVE / STOCHASTIC (test-time: activation-weighted average) pooling, Caffe-exact."""

    caffe_type = "Pooling"

    def __init__(self, method: str, kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                 global_pooling: bool = False):
        super().__init__()
        self.method, self.kernel, self.stride, self.pad = method, kernel, stride, pad
        self.global_pooling = global_pooling

    def extra_repr(self) -> str:
        if self.global_pooling:
            return f"{self.method}, global"
        return f"{self.method}, kernel={self.kernel}, stride={self.stride}, pad={self.pad}"

    def geometry(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], int, int]:
        if self.global_pooling:
            return (h, w), (1, 1), (0, 0), 1, 1
        k, s, p = self.kernel, self.stride, self.pad
        return k, s, p, pool_out(h, k[0], s[0], p[0]), pool_out(w, k[1], s[1], p[1])

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        n, c, h, w = in_shapes[0]
        _, _, _, oh, ow = self.geometry(h, w)
        return [(n, c, oh, ow)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.global_pooling:
            if self.method == "MAX":
                return x.amax(dim=(-2, -1), keepdim=True)
            if self.method == "AVE":
                return x.mean(dim=(-2, -1), keepdim=True)
        k, s, p, oh, ow = self.geometry(int(h), int(w))
        if self.method == "STOCHASTIC":
            num = F.avg_pool2d(x * x, k, s, 0, ceil_mode=True, divisor_override=1)
            den = F.avg_pool2d(x, k, s, 0, ceil_mode=True, divisor_override=1) + torch.finfo(torch.float32).tiny
            return (num / den)[..., :oh, :ow]
        if 2 * p[0] <= k[0] and 2 * p[1] <= k[1]:  # torch's padding limit; its size rule is Caffe's
            if self.method == "MAX":
                y = F.max_pool2d(x, k, s, p, ceil_mode=True)
            else:
                y = F.avg_pool2d(x, k, s, p, ceil_mode=True, count_include_pad=True)
        else:  # pad explicitly, then pool; the window-size divisor is the same as Caffe's
            fill = float("-inf") if self.method == "MAX" else 0.0
            xp = F.pad(x, (p[1], p[1], p[0], p[0]), value=fill)
            if self.method == "MAX":
                y = F.max_pool2d(xp, k, s, 0, ceil_mode=True)
            else:
                y = F.avg_pool2d(xp, k, s, 0, ceil_mode=True, count_include_pad=True)
        if y.shape[-2] != oh or y.shape[-1] != ow:
            y = y[..., :oh, :ow]
        return y


class LRN(CaffeLayer, nn.Module):
    """Local response normalisation, ACROSS_CHANNELS or WITHIN_CHANNEL (see module doc)."""

    caffe_type = "LRN"

    def __init__(self, size: int = 5, alpha: float = 1.0, beta: float = 0.75, k: float = 1.0,
                 region: str = "ACROSS_CHANNELS"):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.region = size, alpha, beta, k, region

    def extra_repr(self) -> str:
        return f"{self.region}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.size
        pad = (n - 1) // 2
        sq = x * x
        if self.region == "ACROSS_CHANNELS":
            sq = F.pad(sq.unsqueeze(1), (0, 0, 0, 0, pad, n - 1 - pad))  # N x 1 x (C+n-1) x H x W
            s = F.avg_pool3d(sq, (n, 1, 1), stride=1).squeeze(1)  # mean over the window = sum / n
            scale = self.k + self.alpha * s
        else:
            s = F.avg_pool2d(sq, n, 1, pad, count_include_pad=True)  # sum / n^2 over the n x n window
            scale = 1.0 + self.alpha * s
        return x * scale.pow(-self.beta)


# ---------------------------------------------------------------------------
# Layers with parameters
# ---------------------------------------------------------------------------


class InnerProduct(CaffeLayer, nn.Linear):
    """Fully connected: flattens from ``axis`` on (Caffe), then ``x W^T + b``.

    ``in_shape`` is the shape of the input from ``axis`` on at the deploy input size
    (e.g. 256 x 6 x 6 for CaffeNet's fc6), which :meth:`as_conv2d` uses to turn the
    layer into the equivalent convolution for dense (fully convolutional) maps.
    """

    caffe_type = "InnerProduct"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, axis: int = 1,
                 in_shape: Shape = (), name: str = "InnerProduct", transpose: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.axis, self.in_shape, self.label, self.transpose = axis, tuple(in_shape), name, transpose

    def out_shapes(self, in_shapes: list[Shape]) -> list[Shape]:
        s = in_shapes[0]
        a = self.axis % len(s)
        return [tuple(s[:a]) + (self.out_features,)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.axis % x.dim()
        if x.dim() > a + 1:
            x = x.flatten(a)
        if x.shape[-1] != self.in_features:
            have = _fmt(tuple(x.shape[a:])) if x.dim() > a else "?"
            raise ModelError(
                f"layer '{self.label}' (InnerProduct) takes {self.in_features} values per image "
                f"({_fmt(self.in_shape)} at the model's input size) but got {x.shape[-1]}; a fully connected "
                "layer needs the model's own input size (size policy 'model'), or tap a convolutional layer"
                + (f" (input was {have})" if have != "?" else "")
            )
        return F.linear(x, self.weight, self.bias)

    def as_conv2d(self) -> nn.Conv2d:
        """The same layer as a convolution over its input map (``fc6`` -> 6x6 conv, ``fc7`` -> 1x1)."""
        if len(self.in_shape) == 3:
            c, h, w = self.in_shape
        elif len(self.in_shape) == 1:
            c, h, w = self.in_shape[0], 1, 1
        else:
            raise ModelError(f"layer '{self.label}': an input of shape {_fmt(self.in_shape)} has no convolution form")
        # skip_init: no random initialisation of weights that are overwritten at once (fc6 of VGG: 100M)
        conv = torch.nn.utils.skip_init(nn.Conv2d, c, self.out_features, (h, w), bias=self.bias is not None,
                                        device=self.weight.device)
        with torch.no_grad():
            conv.weight.copy_(self.weight.reshape(self.out_features, c, h, w))
            if self.bias is not None:
                conv.bias.copy_(self.bias)  # type: ignore[union-attr]
        return conv.to(self.weight.device)

    def caffe_blobs(self) -> list[np.ndarray]:
        w = _np(self.weight)
        return [w.T.copy() if self.transpose else w] + ([_np(self.bias)] if self.bias is not None else [])


class BatchNorm(CaffeLayer, nn.BatchNorm2d):
    """Caffe ``BatchNorm``: no affine part (a ``Scale`` layer follows), any N x C x ... input.

    ``scale_factor`` is the moving-average factor Caffe stores as the third blob; the
    buffers hold the mean and variance already divided by it.
    """

    caffe_type = "BatchNorm"

    def __init__(self, channels: int, eps: float = 1e-5, use_global_stats: bool = True):
        super().__init__(channels, eps=eps, affine=False, track_running_stats=True)
        self.use_global_stats = use_global_stats
        self.scale_factor = 1.0

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNorm expects at least 2-D input (N x C x ...), got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.use_global_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        return F.batch_norm(x, None, None, None, None, True, 0.0, self.eps)

    def caffe_blobs(self) -> list[np.ndarray]:
        f = self.scale_factor
        return [_np(self.running_mean) * f, _np(self.running_var) * f,  # type: ignore[arg-type]
                np.array([f], dtype=np.float32)]


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    a = axis % x.dim() if x.dim() else 0
    return param.reshape((1,) * a + tuple(param.shape) + (1,) * (x.dim() - a - param.dim()))


class Scale(CaffeLayer, nn.Module):
    """``x * scale (+ bias)``; the scale is learned (one bottom) or bottom 1 (two bottoms),
    broadcast from ``axis`` on."""

    caffe_type = "Scale"

    def __init__(self, axis: int, scale_shape: Shape | None, bias_shape: Shape | None):
        super().__init__()
        self.axis = axis
        self.weight = nn.Parameter(torch.ones(scale_shape)) if scale_shape is not None else None
        self.bias = nn.Parameter(torch.zeros(bias_shape)) if bias_shape is not None else None

    def forward(self, x: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if s is None else s
        y = x * (_broadcast(w, x, self.axis) if w.dim() else w)  # type: ignore[union-attr]
        if self.bias is not None:
            y = y + (_broadcast(self.bias, x, self.axis) if self.bias.dim() else self.bias)
        return y

    def caffe_blobs(self) -> list[np.ndarray]:
        out = [_np(self.weight)] if self.weight is not None else []
        return out + ([_np(self.bias)] if self.bias is not None else [])


class Bias(CaffeLayer, nn.Module):
    """``x + bias``; the bias is learned (one bottom) or bottom 1, broadcast from ``axis`` on."""

    caffe_type = "Bias"

    def __init__(self, axis: int, bias_shape: Shape | None):
        super().__init__()
        self.axis = axis
        self.bias = nn.Parameter(torch.zeros(bias_shape)) if bias_shape is not None else None

    def forward(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        v = self.bias if b is None else b
        return x + (_broadcast(v, x, self.axis) if v.dim() else v)  # type: ignore[union-attr]

    def caffe_blobs(self) -> list[np.ndarray]:
        return [_np(self.bias)] if self.bias is not None else []


class PReLU(CaffeLayer, nn.PReLU):
    caffe_type = "PReLU"

    def caffe_blobs(self) -> list[np.ndarray]:
        return [_np(self.weight)]


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


CONV_FIELDS = frozenset({"num_output", "bias_term", "pad", "kernel_size", "stride", "dilation", "pad_h", "pad_w",
                         "kernel_h", "kernel_w", "stride_h", "stride_w", "group", "weight_filler", "bias_filler",
                         "engine", "axis", "force_nd_im2col"})


@builder("Convolution", "Deconvolution")
def _build_conv(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("convolution_param", CONV_FIELDS)
    _need_4d(ld, in_shapes[0])
    if p.int("axis", 1) not in (1, -3):
        raise ModelError(f"{ld.label}: convolution over axis {p.int('axis')} is not supported (only the channel axis 1)")
    if not p.has("num_output"):
        raise FormatError(f"{ld.label}: convolution_param.num_output is required")
    n_out = p.int("num_output")
    kh, kw = _pair(ld, p, "kernel_size", None, required=True)
    sh, sw = _pair(ld, p, "stride", 1)
    ph, pw = _pair(ld, p, "pad", 0)
    dh, dw = _pair(ld, p, "dilation", 1)
    group = p.int("group", 1)
    bias = p.bool("bias_term", True)
    c_in = in_shapes[0][1]
    if kh == 0 or kw == 0 or sh == 0 or sw == 0 or dh == 0 or dw == 0:
        raise FormatError(f"{ld.label}: kernel, stride and dilation must be positive")
    if group < 1 or c_in % group or n_out % group:
        raise ModelError(f"{ld.label}: {c_in} input channels (from '{ld.bottoms[0]}') and num_output {n_out} must "
                         f"both be divisible by group {group}")
    why = f"num_output {n_out}, {c_in} input channels from '{ld.bottoms[0]}', group {group}, kernel {kh}x{kw}"
    wshape = (n_out, c_in // group, kh, kw) if ld.type == "Convolution" else (c_in, n_out // group, kh, kw)
    expected = [("weight", wshape)] + ([("bias", (n_out,))] if bias else [])
    arrays = take_blobs(ld, blobs, expected, why)
    if ld.type == "Convolution":
        m: nn.Module = _construct(Convolution, c_in, n_out, (kh, kw), (sh, sw), (ph, pw), (dh, dw), group, bias,
                                  skip_init=arrays is not None)
    else:
        m = _construct(Deconvolution, c_in, n_out, (kh, kw), (sh, sw), (ph, pw), 0, group, bias, (dh, dw),
                       skip_init=arrays is not None)
    if arrays is not None:
        with torch.no_grad():
            m.weight.copy_(_t(arrays[0]))
            if bias:
                m.bias.copy_(_t(arrays[1]))
    _check_positive(ld, m, in_shapes)
    return m


def _check_positive(ld: LayerDef, m: nn.Module, in_shapes: list[Shape]) -> None:
    out = m.out_shapes(in_shapes)  # type: ignore[attr-defined]
    for s in out:
        if any(d <= 0 for d in s):
            raise ModelError(f"{ld.label}: its input '{ld.bottoms[0]}' is {_fmt(in_shapes[0][1:])}, too small for "
                             f"this layer (output would be {_fmt(s[1:])}); use a larger input size")


POOL_FIELDS = frozenset({"pool", "pad", "pad_h", "pad_w", "kernel_size", "kernel_h", "kernel_w", "stride",
                         "stride_h", "stride_w", "engine", "global_pooling", "round_mode", "dilation", "axis"})


@builder("Pooling")
def _build_pool(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1, 2)
    if len(ld.tops) == 2:
        raise ModelError(f"{ld.label}: a second top (the max-pooling mask) is not supported")
    p = ld.param("pooling_param", POOL_FIELDS)
    _need_4d(ld, in_shapes[0])
    method = _enum(ld, p, "pool", {"MAX": 0, "AVE": 1, "STOCHASTIC": 2}, "MAX")
    if p.has("round_mode") and _enum(ld, p, "round_mode", {"CEIL": 0, "FLOOR": 1}, "CEIL") != "CEIL":
        raise ModelError(f"{ld.label}: round_mode FLOOR (a Caffe fork extension) is not supported")
    glob = p.bool("global_pooling", False)
    if glob:
        if p.has("kernel_size") or p.has("kernel_h") or p.has("kernel_w"):
            raise FormatError(f"{ld.label}: with global_pooling, kernel size cannot be specified")
        k, s, pad = (0, 0), (1, 1), _pair(ld, p, "pad", 0)
        if pad != (0, 0) or _pair(ld, p, "stride", 1) != (1, 1):
            raise FormatError(f"{ld.label}: with global_pooling, stride must be 1 and pad 0")
    else:
        k = _pair(ld, p, "kernel_size", None, required=True)
        s = _pair(ld, p, "stride", 1)
        pad = _pair(ld, p, "pad", 0)
        if min(k) <= 0 or min(s) <= 0:
            raise FormatError(f"{ld.label}: kernel and stride must be positive")
        if pad[0] >= k[0] or pad[1] >= k[1]:
            raise FormatError(f"{ld.label}: pad {pad} must be smaller than the kernel {k}")
        if (pad[0] or pad[1]) and method == "STOCHASTIC":
            raise FormatError(f"{ld.label}: padding is implemented only for AVE and MAX pooling")
    take_blobs(ld, blobs, [])
    m = Pooling(method, k, s, pad, glob)
    _check_positive(ld, m, in_shapes)
    return m


LRN_FIELDS = frozenset({"local_size", "alpha", "beta", "norm_region", "k", "engine"})


@builder("LRN")
def _build_lrn(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    _need_4d(ld, in_shapes[0])
    p = ld.param("lrn_param", LRN_FIELDS)
    size = p.int("local_size", 5)
    if size < 1 or size % 2 == 0:
        raise FormatError(f"{ld.label}: LRN local_size must be odd and positive, got {size}")
    region = _enum(ld, p, "norm_region", {"ACROSS_CHANNELS": 0, "WITHIN_CHANNEL": 1}, "ACROSS_CHANNELS")
    take_blobs(ld, blobs, [])
    return LRN(size, p.float("alpha", 1.0), p.float("beta", 0.75), p.float("k", 1.0), region)


IP_FIELDS = frozenset({"num_output", "bias_term", "weight_filler", "bias_filler", "axis", "transpose"})


@builder("InnerProduct")
def _build_ip(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("inner_product_param", IP_FIELDS)
    if not p.has("num_output"):
        raise FormatError(f"{ld.label}: inner_product_param.num_output is required")
    n_out = p.int("num_output")
    s = in_shapes[0]
    axis = _canon_axis(ld, p.int("axis", 1), len(s))
    k = int(np.prod(s[axis:]))
    bias = p.bool("bias_term", True)
    transpose = p.bool("transpose", False)
    why = f"num_output {n_out}, input '{ld.bottoms[0]}' is {_fmt(s[axis:])} = {k} values"
    wshape = (k, n_out) if transpose else (n_out, k)
    arrays = take_blobs(ld, blobs, [("weight", wshape)] + ([("bias", (n_out,))] if bias else []), why)
    m = _construct(InnerProduct, k, n_out, bias, axis, tuple(s[axis:]), ld.name, transpose,
                   skip_init=arrays is not None)
    if arrays is not None:
        with torch.no_grad():
            m.weight.copy_(_t(arrays[0].T if transpose else arrays[0]))
            if bias:
                m.bias.copy_(_t(arrays[1]))
    return m


@builder("ReLU")
def _build_relu(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("relu_param", frozenset({"negative_slope", "engine"}))
    take_blobs(ld, blobs, [])
    slope = p.float("negative_slope", 0.0)
    return LeakyReLU(slope) if slope != 0.0 else ReLU()


@builder("PReLU")
def _build_prelu(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("prelu_param", frozenset({"filler", "channel_shared"}))
    s = in_shapes[0]
    if len(s) < 2:
        raise ModelError(f"{ld.label}: needs an input of at least 2 dims")
    n = 1 if p.bool("channel_shared", False) else s[1]
    m = PReLU(n, init=0.25)
    arrays = take_blobs(ld, blobs, [("slope", (n,))], f"{'shared' if n == 1 else str(n) + ' channels'}")
    if arrays is not None:
        with torch.no_grad():
            m.weight.copy_(_t(arrays[0]))
    return m


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


BUILDERS["Sigmoid"] = _simple(Sigmoid, "sigmoid_param", frozenset({"engine"}))
BUILDERS["TanH"] = _simple(TanH, "tanh_param", frozenset({"engine"}))
BUILDERS["AbsVal"] = _simple(AbsVal)
BUILDERS["BNLL"] = _simple(BNLL)
BUILDERS["ELU"] = _simple(ELU, "elu_param", frozenset({"alpha"}), alpha=1.0)
BUILDERS["Power"] = _simple(Power, "power_param", frozenset({"power", "scale", "shift"}), power=1.0, scale=1.0,
                            shift=0.0)
BUILDERS["Exp"] = _simple(Exp, "exp_param", frozenset({"base", "scale", "shift"}), base=-1.0, scale=1.0, shift=0.0)
BUILDERS["Log"] = _simple(Log, "log_param", frozenset({"base", "scale", "shift"}), base=-1.0, scale=1.0, shift=0.0)
BUILDERS["Threshold"] = _simple(Threshold, "threshold_param", frozenset({"threshold"}), threshold=0.0)


@builder("Dropout")
def _build_dropout(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("dropout_param", frozenset({"dropout_ratio", "scale_train"}))
    ratio = p.float("dropout_ratio", 0.5)
    if not 0.0 <= ratio < 1.0:
        raise FormatError(f"{ld.label}: dropout_ratio must be in [0, 1), got {ratio}")
    take_blobs(ld, blobs, [])
    return Dropout(ratio, p.bool("scale_train", True))


@builder("BatchNorm")
def _build_bn(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("batch_norm_param", frozenset({"use_global_stats", "moving_average_fraction", "eps", "engine",
                                                 "scale_filler", "bias_filler"}))
    s = in_shapes[0]
    if len(s) < 2:
        raise ModelError(f"{ld.label}: needs an N x C x ... input")
    c = s[1]
    arrays = take_blobs(ld, blobs, [("mean", (c,)), ("variance", (c,)), ("moving-average factor", (1,))],
                        f"{c} channels in '{ld.bottoms[0]}'")
    m = _construct(BatchNorm, c, p.float("eps", 1e-5), p.bool("use_global_stats", True), skip_init=arrays is not None)
    if arrays is not None:
        f = float(arrays[2][0])
        inv = 0.0 if f == 0.0 else 1.0 / f
        with torch.no_grad():
            m.running_mean.copy_(_t(arrays[0] * inv))  # type: ignore[union-attr]
            m.running_var.copy_(_t(arrays[1] * inv))  # type: ignore[union-attr]
        m.scale_factor = f if f != 0.0 else 1.0
    return m


def _param_shape(ld: LayerDef, s: Shape, axis: int, num_axes: int) -> Shape:
    a = _canon_axis(ld, axis, len(s)) if len(s) else 0
    if num_axes < -1:
        raise FormatError(f"{ld.label}: num_axes must be -1 or more, got {num_axes}")
    end = len(s) if num_axes == -1 else a + num_axes
    if end > len(s):
        raise ModelError(f"{ld.label}: axis {axis} + num_axes {num_axes} exceeds the {len(s)}-D input")
    return tuple(s[a:end])


def _check_second_bottom(ld: LayerDef, in_shapes: list[Shape], axis: int) -> None:
    s0, s1 = in_shapes
    if not s1:
        return
    a = _canon_axis(ld, axis, len(s0))
    if tuple(s0[a:a + len(s1)]) != tuple(s1):
        raise ModelError(f"{ld.label}: bottom '{ld.bottoms[1]}' ({_fmt(s1)}) does not match '{ld.bottoms[0]}' "
                         f"({_fmt(s0)}) from axis {a}")


@builder("Scale")
def _build_scale(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1, 2)
    _n_tops(ld, 1)
    p = ld.param("scale_param", frozenset({"axis", "num_axes", "filler", "bias_term", "bias_filler"}))
    axis = p.int("axis", 1)
    bias = p.bool("bias_term", False)
    if len(in_shapes) == 1:
        shape = _param_shape(ld, in_shapes[0], axis, p.int("num_axes", 1))
        m = Scale(axis, shape, shape if bias else None)
        expected = [("scale", shape)] + ([("bias", shape)] if bias else [])
    else:
        _check_second_bottom(ld, in_shapes, axis)
        shape = tuple(in_shapes[1])
        m = Scale(axis, None, shape if bias else None)
        expected = [("bias", shape)] if bias else []
    arrays = take_blobs(ld, blobs, expected, f"input '{ld.bottoms[0]}' is {_fmt(in_shapes[0])}, axis {axis}")
    if arrays is not None:
        with torch.no_grad():
            params = [t for t in (m.weight, m.bias) if t is not None]
            for t, a in zip(params, arrays):
                t.copy_(_t(a))
    return m


@builder("Bias")
def _build_bias(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1, 2)
    _n_tops(ld, 1)
    p = ld.param("bias_param", frozenset({"axis", "num_axes", "filler"}))
    axis = p.int("axis", 1)
    if len(in_shapes) == 1:
        shape = _param_shape(ld, in_shapes[0], axis, p.int("num_axes", 1))
        m = Bias(axis, shape)
        arrays = take_blobs(ld, blobs, [("bias", shape)], f"input '{ld.bottoms[0]}' is {_fmt(in_shapes[0])}")
        if arrays is not None:
            with torch.no_grad():
                m.bias.copy_(_t(arrays[0]))  # type: ignore[union-attr]
        return m
    _check_second_bottom(ld, in_shapes, axis)
    take_blobs(ld, blobs, [])
    return Bias(axis, None)


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


@builder("Softmax")
def _build_softmax(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("softmax_param", frozenset({"axis", "engine"}))
    axis = _canon_axis(ld, p.int("axis", 1), len(in_shapes[0]))
    take_blobs(ld, blobs, [])
    return Softmax(dim=axis)


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


@builder("MVN")
def _build_mvn(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("mvn_param", frozenset({"normalize_variance", "across_channels", "eps"}))
    take_blobs(ld, blobs, [])
    return MVN(p.bool("normalize_variance", True), p.bool("across_channels", False), p.float("eps", 1e-9))


@builder("Silence")
def _build_silence(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1, 1 << 30)
    _n_tops(ld, 0)
    take_blobs(ld, blobs, [])
    return Silence()


def supported_types() -> list[str]:
    """The Caffe layer types deepfeat can run."""
    return sorted(set(BUILDERS) | {"Input"})


def build_layer(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> tuple[nn.Module, list[Shape]]:
    """The module for one layer and its output shapes (raises naming the layer on any problem)."""
    fn = BUILDERS.get(ld.type)
    if fn is None:
        if ld.type in TRAINING_TYPES:
            raise ModelError(
                f"{ld.label}: '{ld.type}' is a training-only layer (data source, loss or metric); use the deploy "
                "prototxt, whose input is an Input layer or an input:/input_shape declaration"
            )
        if ld.type == "Python":
            raise ModelError(f"{ld.label}: Python layers run user code inside Caffe and cannot be loaded")
        raise ModelError(f"{ld.label}: unknown layer type '{ld.type}'; supported types: "
                         f"{', '.join(supported_types())}")
    m = fn(ld, in_shapes, blobs)
    out = m.out_shapes(in_shapes)  # type: ignore[attr-defined]
    if len(out) != len(ld.tops):
        raise ModelError(f"{ld.label}: produces {len(out)} blob(s) but names {len(ld.tops)} top(s)")
    return m, out

