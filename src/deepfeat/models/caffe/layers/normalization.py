"""Normalisation layers: LRN, BatchNorm, Scale, Bias, MVN.

* LRN across channels is ``x / (k + alpha/n * sum x^2)^beta``; within a channel it
  is ``x / (1 + alpha/n^2 * sum x^2)^beta`` over an n x n zero-padded window (Caffe
  hard-codes the 1 there and ignores ``k``);
* BatchNorm divides the stored mean and variance by the moving-average factor
  (the third blob), or uses batch statistics if ``use_global_stats: false``; the
  affine part is a following ``Scale`` layer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepfeat.errors import FormatError, ModelError
from deepfeat.models.caffe.layers.base import (
    CaffeLayer,
    Shape,
    _canon_axis,
    _construct,
    _enum,
    _fmt,
    _n_bottoms,
    _n_tops,
    _need_4d,
    _np,
    _t,
    builder,
    take_blobs,
)
from deepfeat.models.caffe.netdef import LayerDef
from deepfeat.models.caffe.wire import Blob


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


# ---------------------------------------------------------------------------
# Builders: (layer, input shapes, blobs or None) -> module
# ---------------------------------------------------------------------------


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


@builder("MVN")
def _build_mvn(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("mvn_param", frozenset({"normalize_variance", "across_channels", "eps"}))
    take_blobs(ld, blobs, [])
    return MVN(p.bool("normalize_variance", True), p.bool("across_channels", False), p.float("eps", 1e-9))

