"""Caffe pooling: MAX / AVE / STOCHASTIC, Caffe-exact.

The output size is Caffe's (``ceil`` rounding, then dropping a last window that
would start in the padding) and, for AVE, the divisor is the window size clipped to
the padded input, not to the image (``count_include_pad`` semantics).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deepfeat.errors import FormatError, ModelError
from deepfeat.models.caffe.layers.base import (
    CaffeLayer,
    Shape,
    _check_positive,
    _enum,
    _n_bottoms,
    _n_tops,
    _need_4d,
    _pair,
    builder,
    take_blobs,
)
from deepfeat.models.caffe.netdef import LayerDef
from deepfeat.models.caffe.wire import Blob


def pool_out(size: int, k: int, s: int, p: int) -> int:
    """Caffe's pooled size: ceil rounding, minus a last window starting in the padding."""
    out = math.ceil((size + 2 * p - k) / s) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    return out


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


# ---------------------------------------------------------------------------
# Builder: (layer, input shapes, blobs or None) -> module
# ---------------------------------------------------------------------------


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

