"""Layers with weights over a map or a vector: Convolution, Deconvolution and
InnerProduct (fully connected; :meth:`InnerProduct.as_conv2d` is its convolution form,
which net surgery uses for dense maps).
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
    _check_positive,
    _construct,
    check_weight_size,
    _fmt,
    _n_bottoms,
    _n_tops,
    _need_4d,
    _np,
    _pair,
    _t,
    builder,
    take_blobs,
)
from deepfeat.models.caffe.netdef import LayerDef
from deepfeat.models.caffe.wire import Blob


def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


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


# ---------------------------------------------------------------------------
# Builders: (layer, input shapes, blobs or None) -> module
# ---------------------------------------------------------------------------


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
    check_weight_size(ld, wshape, why)
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
    check_weight_size(ld, wshape, why)
    arrays = take_blobs(ld, blobs, [("weight", wshape)] + ([("bias", (n_out,))] if bias else []), why)
    m = _construct(InnerProduct, k, n_out, bias, axis, tuple(s[axis:]), ld.name, transpose,
                   skip_init=arrays is not None)
    if arrays is not None:
        with torch.no_grad():
            m.weight.copy_(_t(arrays[0].T if transpose else arrays[0]))
            if bias:
                m.bias.copy_(_t(arrays[1]))
    return m

