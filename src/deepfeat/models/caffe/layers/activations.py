"""Activations and other element-wise functions of one blob: ReLU (leaky), PReLU,
Sigmoid, TanH, ELU, AbsVal, BNLL, Power, Exp, Log, Threshold, Dropout, Softmax.

Dropout is the identity at test time (times ``1 - ratio`` if ``scale_train: false``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deepfeat.errors import FormatError, ModelError
from deepfeat.models.caffe.layers.base import (
    BUILDERS,
    CaffeLayer,
    Shape,
    _canon_axis,
    _n_bottoms,
    _n_tops,
    _np,
    _simple,
    _t,
    builder,
    take_blobs,
)
from deepfeat.models.caffe.netdef import LayerDef
from deepfeat.models.caffe.wire import Blob


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


class PReLU(CaffeLayer, nn.PReLU):
    caffe_type = "PReLU"

    def caffe_blobs(self) -> list[np.ndarray]:
        return [_np(self.weight)]


# ---------------------------------------------------------------------------
# Builders: (layer, input shapes, blobs or None) -> module
# ---------------------------------------------------------------------------


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


@builder("Softmax")
def _build_softmax(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> nn.Module:
    _n_bottoms(ld, in_shapes, 1)
    _n_tops(ld, 1)
    p = ld.param("softmax_param", frozenset({"axis", "engine"}))
    axis = _canon_axis(ld, p.int("axis", 1), len(in_shapes[0]))
    take_blobs(ld, blobs, [])
    return Softmax(dim=axis)

