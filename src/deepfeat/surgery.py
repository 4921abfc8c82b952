"""Net surgery: a classifier cast as convolutions, so a larger input gives a map of class scores.

This is the classic Caffe "net surgery" example (``net_surgery.ipynb``): CaffeNet's
``fc6``/``fc7``/``fc8`` are reshaped into 6x6 and 1x1 convolutions, after which a
451 x 451 input yields an 8 x 8 grid of class probabilities, one per 227 x 227
window every 32 pixels (cells = (input - 227) / 32 + 1). Here it works for every
kind of model deepfeat loads:

* **flattening FC heads** (Caffe ``InnerProduct`` layers, torchvision AlexNet/VGG):
  the first FC layer after the flatten becomes a k x k convolution over the feature
  map it was trained on (:func:`fc_to_conv_weight`: ``out x (C*k*k)`` ->
  ``out x C x k x k``, the C, H, W flatten order of both frameworks), later FC
  layers 1x1 convolutions. torchvision's ``AdaptiveAvgPool2d(6)``/``(7)`` is an
  identity at the native input size and is dropped (at a larger input it would
  squash the map back to 6 x 6).
* **global pooling + linear heads** (timm, the embedded EfficientNet-Lite,
  torchvision ResNet/MobileNet/EfficientNet/DenseNet/RegNet...): the linear layer
  runs as a 1x1 convolution on the un-pooled feature map, after the global pooling
  has become a sliding pool over a *window* of feature cells. With the default
  ``window="native"`` the window is the feature-map size at the model's native
  input (7 x 7 for a 224 input at stride 32), so each cell is exactly the
  classifier applied to one native-size window of the input, as in the Caffe
  example; ``window=1`` classifies every feature-map cell on its own (a class
  activation map: since pooling and the linear layer are both linear for average
  pooling, the mean of those per-cell logits is the original logits).

The result of :func:`fully_convolutional` is a plain ``nn.Module``
(:class:`DenseClassifier`) that maps the normalised ``N x C x H x W`` batch to
``N x classes x h x w`` *probabilities* by default (a softmax over the class axis
is appended for models whose output is logits; Caffe nets ending in a ``Softmax``
layer already give probabilities); ``softmax=False`` keeps the model's own output
kind. It can be saved with ``torch.save`` (module or ``state_dict``). Every
conversion is checked numerically when it is built: at the native input size the
one cell must equal the original classifier, and (for the pooled heads) each cell
of a larger map must equal the original head applied to its window. A head that
cannot be written as convolutions raises :class:`~deepfeat.errors.ModelError`
saying which operation is in the way.

:func:`dense_map` runs it on an image and returns a :class:`DenseMap` (probabilities
per cell, the argmax grid, the top-class probability map, labels).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ModelError, UsageError
from .models.base import Model

log = logging.getLogger(__name__)

__all__ = [
    "DenseClassifier",
    "DenseMap",
    "dense_map",
    "fc_to_conv_weight",
    "fully_convolutional",
    "linear_to_conv",
    "load_pixels",
]

#: Tolerance of the built-in equivalence checks (relative to the output's magnitude).
CHECK_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------
# FC weights as convolution weights
# ---------------------------------------------------------------------------


def _pair(k: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(k, int):
        return k, k
    kh, kw = (int(v) for v in k)
    return kh, kw


def fc_to_conv_weight(weight, in_channels: int, k: int | Sequence[int]):
    """Reshape a fully connected weight ``out x (C*kh*kw)`` into a convolution weight
    ``out x C x kh x kw``.

    Valid because PyTorch's ``flatten`` of an ``N x C x H x W`` map and Caffe's
    ``InnerProduct`` both read the map in C, H, W order: the convolution over a
    ``C x kh x kw`` input gives exactly the FC output, and over a larger map one
    output per window. *weight* is a torch tensor or numpy array (the same type is
    returned); *k* is an int or ``(kh, kw)``.
    """
    kh, kw = _pair(k)
    if in_channels <= 0 or kh <= 0 or kw <= 0:
        raise UsageError(f"in_channels and k must be positive, got in_channels={in_channels}, k={k}")
    shape = tuple(weight.shape)
    if len(shape) != 2:
        raise UsageError(f"a fully connected weight is 2-D (out x in), got shape {shape}")
    out, n_in = shape
    if n_in != in_channels * kh * kw:
        raise UsageError(
            f"a weight with {n_in} inputs cannot be a {in_channels} x {kh} x {kw} convolution "
            f"({in_channels * kh * kw} inputs); the FC layer's input map must have exactly that shape"
        )
    return weight.reshape(out, in_channels, kh, kw)


def linear_to_conv(linear: nn.Linear, in_channels: int | None = None, k: int | Sequence[int] = 1) -> nn.Conv2d:
    """The :class:`~torch.nn.Conv2d` equal to *linear* over a ``C x kh x kw`` input
    (``in_channels`` defaults to ``in_features / (kh*kw)``); weights are copied."""
    kh, kw = _pair(k)
    c = in_channels if in_channels is not None else linear.in_features // (kh * kw)
    w = fc_to_conv_weight(linear.weight.detach(), c, (kh, kw))
    conv = torch.nn.utils.skip_init(nn.Conv2d, c, linear.out_features, (kh, kw), bias=linear.bias is not None,
                                     device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():  # every value is overwritten, so the (slow, for fc6-size layers) init is skipped
        conv.weight.copy_(w)
        if linear.bias is not None:
            conv.bias.copy_(linear.bias.detach())  # type: ignore[union-attr]
    return conv


# ---------------------------------------------------------------------------
# Small modules the dense heads are made of (saveable, no closures)
# ---------------------------------------------------------------------------


class Elementwise(nn.Module):
    """An element-wise function of ``torch.nn.functional`` (``relu``, ``hardswish``...)
    applied to any shape; stands in for a functional call found in a traced head."""

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None):
        super().__init__()
        if name not in _ELEMENTWISE_FUNCS:
            raise UsageError(f"{name!r} is not an element-wise function deepfeat knows")
        self.name = name
        self.kwargs = dict(kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(torch.nn.functional, self.name)(x, **self.kwargs)

    def extra_repr(self) -> str:
        return self.name + (f", {self.kwargs}" if self.kwargs else "")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an ``N x C x H x W`` map, per position: the
    dense form of a LayerNorm applied to a pooled ``N x C`` vector (ConvNeXt heads)."""

    def __init__(self, channels: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
        super().__init__()
        self.channels, self.eps = channels, float(eps)
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class _ForwardFeatures(nn.Module):
    """A timm model's ``forward_features`` as a module (the trunk of a dense timm model)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


class _ForwardHead(nn.Module):
    """A timm model's ``forward_head`` as a module, for tracing."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(x)


class DenseClassifier(nn.Module):
    """A classifier cast as convolutions: ``N x C x H x W`` normalised input ->
    ``N x classes x h x w`` (probabilities when :attr:`output_kind` is ``"probs"``).

    ``trunk`` computes the feature map (or, for a converted Caffe net, everything);
    ``head`` is the converted classifier (sliding pool, convolutions,
    activations). ``native_size`` is the input (H, W) at which the map is 1 x 1 and
    equals the original classifier; ``window`` the pooling window in feature cells
    (``None`` for flattening FC heads, whose window is their first convolution).
    """

    def __init__(self, trunk: nn.Module, head: nn.Module, *, softmax: bool, output_kind: str,
                 native_size: tuple[int, int], window: tuple[int, int] | None, kind: str, arch: str = "",
                 window_mode: str | int = "native"):
        super().__init__()
        self.window_mode = window_mode
        self.trunk = trunk
        self.head = head
        self.softmax = bool(softmax)
        self.output_kind = output_kind
        self.native_size = (int(native_size[0]), int(native_size[1]))
        self.window = window
        self.kind = kind
        self.arch = arch

    @property
    def min_input(self) -> tuple[int, int] | None:
        """The smallest input (H, W) that gives at least one cell, when it is the native size
        (flattening FC heads, or a pooling window of the native feature-map size)."""
        if self.window is not None and (self.kind == "fc" or self.window_mode == "native"):
            return self.native_size
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.trunk(x))
        if y.dim() == 2:  # a net that is already fully connected to one cell
            y = y[:, :, None, None]
        return y.softmax(dim=1) if self.softmax else y

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, native_size={self.native_size}, window={self.window}, "
                f"output={self.output_kind!r}")


# ---------------------------------------------------------------------------
# Converting a traced head, op by op
# ---------------------------------------------------------------------------

_ELEMENTWISE_FUNCS = frozenset({
    "relu", "relu6", "relu_", "hardswish", "hardsigmoid", "silu", "gelu", "sigmoid", "tanh", "elu", "selu",
    "celu", "leaky_relu", "mish", "softplus", "hardtanh",
})
_ELEMENTWISE_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"})
_LAYOUT_METHODS = frozenset({"contiguous"})


def _fn_name(target: Any) -> str:
    return getattr(target, "__name__", str(target))


def _is_activation(m: nn.Module) -> bool:
    from .taps import _is_activation as taps_is_activation

    return taps_is_activation(m)


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(int(s) for s in meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_tensor_node(node) -> bool:
    """A node computing a tensor (not a parameter fetch, not a shape query like ``x.size(0)``)."""
    return node.op != "get_attr" and (node.op == "placeholder" or "tensor_meta" in node.meta)


def _tensor_inputs(node) -> list:
    return [n for n in node.all_input_nodes if _is_tensor_node(n)]


def _tensor_users(node) -> list:
    return [n for n in node.users if _is_tensor_node(n) or n.op == "output"]


def _describe(node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_function":
        return f"function {_fn_name(node.target)}()"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target}"


def _arg(node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dims(v: Any) -> tuple[int, ...] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v,)
    try:
        return tuple(int(d) for d in v)
    except TypeError:
        return None


def _is_flatten(node, gm) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Flatten)
    if node.op == "call_function" and node.target is torch.flatten:
        return True
    return bool(node.op == "call_method" and node.target in ("flatten", "view", "reshape", "squeeze"))


def _is_spatial_mean(node) -> bool:
    if (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean):
        dims = _dims(_arg(node, 1, "dim"))
        return dims is not None and {d % 4 for d in dims} == {2, 3}
    return False


_ADAPTIVE_FUNCS = ("adaptive_avg_pool2d", "adaptive_max_pool2d")


def _pool_kind(node, gm) -> str | None:
    """'avg' or 'max' if *node* is a pooling a global/adaptive pool can be read from."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            return "avg"
        if isinstance(m, (nn.AdaptiveMaxPool2d, nn.MaxPool2d)):
            return "max"
        return None
    if node.op == "call_function" and _fn_name(node.target) in _ADAPTIVE_FUNCS:
        return "avg" if "avg" in _fn_name(node.target) else "max"
    if _is_spatial_mean(node):
        return "avg"
    return None


def _is_head_start(node, gm) -> bool:
    """Where a classifier head begins: a pooling that ends at 1 x 1 (or an adaptive one),
    a spatial mean, or a flatten of a 4-D map."""
    shp_in = _shape(_tensor_inputs(node)[0]) if _tensor_inputs(node) else None
    shp_out = _shape(node)
    if shp_in is None or shp_out is None or len(shp_in) != 4:
        return False
    kind = _pool_kind(node, gm)
    if kind is not None:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.AvgPool2d, nn.MaxPool2d)):
            return len(shp_out) == 4 and shp_out[2:] == (1, 1) and shp_in[2] * shp_in[3] > 1
        return True
    return _is_flatten(node, gm) and len(shp_out) == 2


def _class_axis(dim: Any, ndim: int) -> bool:
    """Whether a softmax over *dim* of a rank-*ndim* value in the original head is over classes."""
    return dim == 1 or (ndim == 2 and dim == -1)


def _window_pool(kind: str, k: tuple[int, int]) -> nn.Module:
    return nn.AvgPool2d(k, stride=1) if kind == "avg" else nn.MaxPool2d(k, stride=1)


def _convert_head(gm, window: str | int, arch: str) -> tuple[nn.Sequential, tuple[int, int] | None, str]:
    """Convert a traced head (placeholder = feature map, shapes propagated at the
    native size) into convolutional modules. Returns (head, window cells, kind)."""
    nodes = [n for n in gm.graph.nodes if n.op == "output" or _is_tensor_node(n)]
    if not nodes or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        raise ModelError(f"{arch}: the classifier head could not be read")
    chain = nodes[1:-1]
    prev = nodes[0]
    for node in chain + [nodes[-1]]:
        ins = _tensor_inputs(node)
        if len(ins) != 1 or ins[0] is not prev or len(_tensor_users(prev)) != 1:
            raise ModelError(
                f"{arch}: the classifier head is not a simple chain of layers after the feature map "
                f"({_describe(node)} combines several values), so it has no convolutional form"
            )
        prev = node

    out: list[nn.Module] = []
    fmap = _shape(nodes[0])
    if fmap is None or len(fmap) != 4:
        raise ModelError(f"{arch}: the features before the classifier are not an N x C x H x W map")
    channels = fmap[1]
    ndim = 4  # rank of the value in the *original* head
    flat: tuple[int, int, int] | None = None  # (C, h, w) flattened and not yet consumed by an FC layer
    layout = "nchw"
    used_window: tuple[int, int] | None = None
    pooled = False
    kind = "fc"

    def fail(node, why: str) -> ModelError:
        return ModelError(f"{arch}: cannot cast the classifier as convolutions: {_describe(node)} {why}")

    for node in chain:
        x_shape = _shape(_tensor_inputs(node)[0])
        y_shape = _shape(node)
        if x_shape is None or y_shape is None:
            raise fail(node, "did not produce a tensor")
        pool = _pool_kind(node, gm)
        if pool is not None and len(x_shape) == 4:
            if pooled:
                raise fail(node, "is a second pooling after the global one")
            if len(y_shape) == 4 and y_shape[2:] == x_shape[2:]:
                continue  # an adaptive pool that is the identity at the native size (AlexNet/VGG)
            if len(y_shape) == 2 or y_shape[2:] == (1, 1):
                k = (x_shape[2], x_shape[3]) if window == "native" else _pair(int(window))
                out.append(_window_pool(pool, k))
                used_window, pooled, kind = k, True, "global-pool"
                channels = x_shape[1]
                if len(y_shape) == 2:
                    ndim = 2  # pooled to a vector: a 1 x 1 map in the dense form
                continue
            raise fail(node, f"pools {x_shape[2]} x {x_shape[3]} to {y_shape[2]} x {y_shape[3]} at the native "
                             "input size, which is not a fixed sliding window")
        if _is_flatten(node, gm):
            if len(x_shape) == 4 and len(y_shape) == 2:
                if layout != "nchw":
                    raise fail(node, "flattens a channels-last map")
                channels, ndim = x_shape[1], 2
                flat = (x_shape[1], x_shape[2], x_shape[3]) if x_shape[2] * x_shape[3] > 1 else None
                continue
            if len(x_shape) == len(y_shape):
                continue
            raise fail(node, f"reshapes {list(x_shape)} to {list(y_shape)}")
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.Linear):
                if ndim != 2:
                    raise fail(node, "is a Linear layer applied to a 4-D map")
                c, h, w = flat if flat is not None else (channels, 1, 1)
                if c * h * w != m.in_features:
                    raise fail(node, f"takes {m.in_features} inputs but gets {c} x {h} x {w}")
                if h * w > 1 and window != "native":
                    raise UsageError(f"{arch}: the classifier is a {h} x {w} convolution over the feature map; "
                                     f"window={window!r} applies only to global-pooling heads")
                out.append(linear_to_conv(m, c, (h, w)))
                channels, flat = m.out_features, None
                if h * w > 1:
                    used_window = (h, w)
                continue
            if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)):
                out.append(copy.deepcopy(m))
                continue
            if isinstance(m, nn.Softmax):
                if not _class_axis(m.dim, ndim):
                    raise fail(node, f"is a softmax over axis {m.dim}, not the class axis")
                out.append(nn.Softmax(dim=1))
                continue
            if _is_activation(m):
                out.append(copy.deepcopy(m))
                continue
            if isinstance(m, nn.BatchNorm2d) and ndim == 4:
                out.append(copy.deepcopy(m))
                continue
            if isinstance(m, nn.BatchNorm1d) and ndim == 2 and flat is None:
                bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
                bn.load_state_dict(m.state_dict())
                out.append(bn.to(next(m.parameters(), torch.empty(0)).device))
                continue
            if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and (
                    (ndim == 2 and flat is None) or (ndim == 4 and layout == "nhwc")):
                out.append(ChannelLayerNorm(m.normalized_shape[0], m.weight, m.bias, m.eps))
                continue
            if isinstance(m, nn.Conv2d) and ndim == 4 and x_shape[2:] == (1, 1) and m.kernel_size == (1, 1) \
                    and m.stride == (1, 1) and m.padding in ((0, 0), "valid"):
                out.append(copy.deepcopy(m))
                channels = m.out_channels
                continue
            raise fail(node, f"({type(m).__name__}) has no convolutional form deepfeat knows")
        if node.op == "call_function":
            name = _fn_name(node.target)
            if name == "linear":
                if ndim != 2:
                    raise fail(node, "is a linear map applied to a 4-D map")
                wn, bn_ = _arg(node, 1, "weight"), _arg(node, 2, "bias")
                weight = gm.get_parameter(wn.target) if hasattr(wn, "target") else None
                bias = gm.get_parameter(bn_.target) if hasattr(bn_, "target") else None
                if weight is None:
                    raise fail(node, "has no parameter weight")
                lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(weight)
                    if bias is not None:
                        lin.bias.copy_(bias)
                c, h, w = flat if flat is not None else (channels, 1, 1)
                if c * h * w != lin.in_features:
                    raise fail(node, f"takes {lin.in_features} inputs but gets {c} x {h} x {w}")
                out.append(linear_to_conv(lin.to(weight.device), c, (h, w)))
                channels, flat = lin.out_features, None
                continue
            if name == "dropout":
                continue  # identity at inference
            if name in _ELEMENTWISE_FUNCS:
                extra = {k: v for k, v in node.kwargs.items() if k != "inplace"}
                if len(node.args) > 1:
                    raise fail(node, "has positional arguments deepfeat does not map")
                out.append(Elementwise(name.rstrip("_"), extra))
                continue
            if name == "layer_norm" and ndim == 4 and layout == "nhwc":
                ns = _dims(_arg(node, 1, "normalized_shape"))
                wn, bn_ = _arg(node, 2, "weight"), _arg(node, 3, "bias")
                eps = _arg(node, 4, "eps", 1e-5)
                if ns != (x_shape[3],):
                    raise fail(node, "normalises over more than the channel axis")
                weight = gm.get_parameter(wn.target) if hasattr(wn, "target") else None
                bias = gm.get_parameter(bn_.target) if hasattr(bn_, "target") else None
                out.append(ChannelLayerNorm(ns[0], weight, bias, eps))
                continue
            if name == "softmax":
                dim = _arg(node, 1, "dim")
                if not _class_axis(dim, ndim):
                    raise fail(node, f"is a softmax over axis {dim}, not the class axis")
                out.append(nn.Softmax(dim=1))
                continue
            raise fail(node, "has no convolutional form deepfeat knows")
        if node.op == "call_method":
            name = str(node.target)
            if name in _LAYOUT_METHODS:
                continue
            if name == "permute" and ndim == 4:
                dims = _dims(node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims"))
                if dims == (0, 2, 3, 1) and layout == "nchw":
                    layout = "nhwc"
                    continue
                if dims == (0, 3, 1, 2) and layout == "nhwc":
                    layout = "nchw"
                    continue
                raise fail(node, f"permutes the axes as {dims}")
            if name in _ELEMENTWISE_METHODS:
                out.append(Elementwise(name.rstrip("_")))
                continue
            if name == "softmax":
                dim = _arg(node, 1, "dim")
                if not _class_axis(dim, ndim):
                    raise fail(node, f"is a softmax over axis {dim}, not the class axis")
                out.append(nn.Softmax(dim=1))
                continue
            raise fail(node, "has no convolutional form deepfeat knows")
        raise fail(node, "has no convolutional form deepfeat knows")
    if layout != "nchw":
        raise ModelError(f"{arch}: the classifier head ends in a channels-last layout")
    if flat is not None and (flat[1] * flat[2] > 1):
        raise ModelError(f"{arch}: the head flattens the feature map but no fully connected layer follows")
    if not pooled and used_window is None and kind == "fc":
        raise ModelError(f"{arch}: no global pooling or flattening found before the classifier")
    if window != "native" and not pooled:
        raise UsageError(f"{arch}: window={window!r} applies only to global-pooling heads")
    return nn.Sequential(*out), used_window, kind


# ---------------------------------------------------------------------------
# Splitting a model into feature trunk and head
# ---------------------------------------------------------------------------


def _shape_prop(gm, *example: torch.Tensor) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*example)


class _LeafTracer(torch.fx.Tracer):
    """Keeps every Linear/Conv/Norm/activation a single node, whoever defined it (timm's
    ``Linear`` subclass, Caffe's ``InnerProduct``)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.Dropout, nn.Flatten,
                          nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)):
            return True
        if type(m) is nn.LayerNorm:  # subclasses (LayerNorm2d) are traced into permute + layer_norm
            return True
        return _is_activation(m) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module, arch: str):
    try:
        graph = _LeafTracer().trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises many types for untraceable code; all mean the same here
        raise ModelError(f"{arch}: cannot read the network's structure to cast its classifier as convolutions "
                         f"(torch.fx tracing failed: {type(e).__name__}: {e})") from None
    return torch.fx.GraphModule(module, graph)


def _native_input(model: Model, batch: int = 1, seed: int = 0) -> torch.Tensor:
    h, w = model.data_config.input_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.data_config.channels, h, w, generator=g).to(model.device)


def _split_timm(net: nn.Module, model: Model) -> tuple[nn.Module, Any]:
    trunk = _ForwardFeatures(net)
    head = _trace(_ForwardHead(net), model.arch)
    with torch.no_grad():
        fmap = trunk(_native_input(model))
    if fmap.dim() != 4:
        raise ModelError(f"{model.arch}: forward_features gives a {fmap.dim()}-D output, not an N x C x H x W map "
                         "(a transformer without a spatial map has no dense form)")
    _shape_prop(head, fmap)
    return trunk, head


def _split_fx(net: nn.Module, model: Model) -> tuple[nn.Module, Any]:
    """Split a traced network at the start of its classifier head: the trunk returns the
    feature map, the head graph takes it as its placeholder."""
    from torch import fx

    gm = _trace(net, model.arch)
    _shape_prop(gm, _native_input(model))
    nodes = list(gm.graph.nodes)
    out_node = next(n for n in nodes if n.op == "output")
    # walk back from the output along the single-input chain
    chain = []
    cur = _tensor_inputs(out_node)
    cur = cur[0] if len(cur) == 1 else None
    while cur is not None and cur.op not in ("placeholder",):
        chain.append(cur)
        ins = _tensor_inputs(cur)
        if len(ins) != 1 or len(_tensor_users(ins[0])) != 1:
            break
        cur = ins[0]
    chain.reverse()
    start = next((i for i, n in enumerate(chain) if _is_head_start(n, gm)), None)
    if start is None:
        raise ModelError(f"{model.arch}: no global pooling or flatten of a feature map was found before the "
                         "classifier, so there is no head to cast as convolutions")
    fmap_node = _tensor_inputs(chain[start])[0]
    head_nodes = chain[start:]

    trunk_graph = fx.Graph()
    env: dict = {}
    for n in nodes:
        env[n] = trunk_graph.node_copy(n, lambda a: env[a])
        if n is fmap_node:
            break
    trunk_graph.output(env[fmap_node])
    trunk = fx.GraphModule(gm, trunk_graph)
    trunk.graph.eliminate_dead_code()
    trunk.recompile()

    head_graph = fx.Graph()
    henv: dict = {fmap_node: head_graph.placeholder("fmap")}
    order = {n: i for i, n in enumerate(nodes)}

    def copy_head(n):
        """Copy *n* and what it needs that is computed from the feature map (``x.size(0)``)
        or is a parameter; anything else from before the feature map is not a head."""
        if n in henv:
            return henv[n]
        if n.op != "get_attr" and order[n] < order[fmap_node]:
            raise ModelError(f"{model.arch}: the classifier head uses {_describe(n)} from before the feature map, "
                             "so it has no convolutional form")
        for a in n.all_input_nodes:
            copy_head(a)
        henv[n] = head_graph.node_copy(n, lambda a: henv[a])
        return henv[n]

    for n in head_nodes:
        copy_head(n)
    head_graph.output(henv[head_nodes[-1]])
    head = fx.GraphModule(gm, head_graph)
    with torch.no_grad():
        fmap = trunk(_native_input(model))
    _shape_prop(head, fmap)
    return trunk, head


def _caffe_classes():
    try:
        from .models.caffe.layers import Flatten, InnerProduct, Pooling, Reshape
        from .models.caffe.net import CaffeNet
    except ImportError:  # the caffe source is not part of this installation
        return None
    return CaffeNet, InnerProduct, Flatten, Pooling, Reshape


def _convert_caffe(net: nn.Module, model: Model, window: str | int) -> tuple[nn.Module, tuple[int, int] | None, str]:
    """Replace a CaffeNet's InnerProduct layers by convolutions (``fc6`` -> 6x6, later ones
    1x1), its Flatten layers by identities and a global pooling by a sliding window."""
    _CaffeNet, InnerProduct, Flatten, Pooling, Reshape = _caffe_classes()  # type: ignore[misc]
    arch = model.arch
    pool_inputs: dict[str, tuple[int, ...]] = {}
    handles = []

    def record(name: str):
        def hook(_m, args) -> None:
            pool_inputs.setdefault(name, tuple(args[0].shape))

        return hook

    for name, m in net.named_children():
        if isinstance(m, Pooling) and m.global_pooling:
            handles.append(m.register_forward_pre_hook(record(name)))
    try:
        if handles:
            with torch.no_grad():
                net(_native_input(model))
    finally:
        for h in handles:
            h.remove()
    used_window: tuple[int, int] | None = None
    kind = None
    pooled = False
    for name, m in list(net.named_children()):
        if isinstance(m, InnerProduct):
            if m.axis != 1:
                raise ModelError(f"{arch}: InnerProduct layer '{m.label}' flattens from axis {m.axis}, not 1; "
                                 "only axis-1 layers have a convolutional form")
            if len(m.in_shape) == 3 and m.in_shape[1] * m.in_shape[2] > 1:
                if window != "native" and not pooled:
                    raise UsageError(f"{arch}: '{m.label}' is a {m.in_shape[1]} x {m.in_shape[2]} convolution over "
                                     f"the feature map; window={window!r} applies only to global-pooling heads")
                used_window = used_window or (m.in_shape[1], m.in_shape[2])
                kind = kind or "fc"
            shape = tuple(m.in_shape)
            if len(shape) not in (1, 3):
                raise ModelError(f"{arch}: InnerProduct layer '{m.label}' reads a {len(shape)}-D input; only "
                                 "C x H x W maps and vectors have a convolutional form")
            c, h, w = shape if len(shape) == 3 else (shape[0], 1, 1)
            setattr(net, name, linear_to_conv(m, c, (h, w)))  # what InnerProduct.as_conv2d does, without the init
        elif isinstance(m, Flatten):
            if m.start_dim != 1:
                raise ModelError(f"{arch}: Flatten layer '{name}' starts at axis {m.start_dim}; only axis-1 "
                                 "flattening before a fully connected layer can be made convolutional")
            setattr(net, name, nn.Identity())
        elif isinstance(m, Reshape):
            raise ModelError(f"{arch}: Reshape layer '{name}' fixes the blob shape, so the net cannot take a "
                             "larger input; no convolutional form")
        elif isinstance(m, Pooling) and m.global_pooling:
            shp = pool_inputs.get(name)
            if shp is None or len(shp) != 4:
                raise ModelError(f"{arch}: global pooling layer '{name}' did not run on a 4-D map")
            k = (shp[2], shp[3]) if window == "native" else _pair(int(window))
            if m.method not in ("AVE", "MAX"):
                raise ModelError(f"{arch}: global {m.method} pooling has no sliding-window form")
            setattr(net, name, _window_pool("avg" if m.method == "AVE" else "max", k))
            used_window, kind, pooled = k, "global-pool", True
    if window != "native" and not pooled:
        raise UsageError(f"{arch}: window={window!r} applies only to nets with a global pooling layer")
    return net, used_window, kind or "convolutional"


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().flatten(), b.detach().float().flatten()
    if a.shape != b.shape:
        return math.inf
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) / scale


def _check_native(dense: DenseClassifier, model: Model) -> None:
    x = _native_input(model, batch=1, seed=1)
    with torch.no_grad():
        ref = model.net(x).float()
        if ref.dim() > 2:
            ref = ref.flatten(1)
        if dense.softmax:
            ref = ref.softmax(dim=-1)
        got = dense(x)
    if got.shape[2:] != (1, 1):
        raise ModelError(f"{model.arch}: the dense form gives a {got.shape[2]} x {got.shape[3]} map at the native "
                         f"input size, not 1 x 1; the head was not converted correctly")
    diff = _max_rel_diff(got.flatten(1), ref)
    if diff > CHECK_TOLERANCE:
        raise ModelError(f"{model.arch}: the dense form does not reproduce the classifier at the native input size "
                         f"(max difference {diff:.3g}); its head has an operation deepfeat cannot cast as a "
                         "convolution")


def _check_sliding(head_gm, head: nn.Module, fmap_shape: tuple[int, ...], window: tuple[int, int] | None,
                   arch: str) -> None:
    """Each cell of the dense head on a (h+1) x (w+1) map must equal the original head on its window."""
    if window is None:
        return
    c = fmap_shape[1]
    kh, kw = window
    g = torch.Generator().manual_seed(2)
    dev = next((p.device for p in head.parameters()), torch.device("cpu"))
    big = torch.randn(1, c, kh + 1, kw + 1, generator=g).abs().to(dev)
    with torch.no_grad():
        dense = head(big)
        for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
            ref = head_gm(big[:, :, i:i + kh, j:j + kw].contiguous()).float().flatten(1)
            diff = _max_rel_diff(dense[:, :, i, j], ref)
            if diff > CHECK_TOLERANCE:
                raise ModelError(f"{arch}: the converted head does not slide like the original one (cell {i},{j} "
                                 f"differs by {diff:.3g}); its head has an operation with no convolutional form")


def fully_convolutional(model: Model, *, window: str | int = "native", softmax: bool = True,
                        check: bool = True) -> DenseClassifier:
    """Cast *model*'s classifier as convolutions (see the module docstring).

    Returns a :class:`DenseClassifier`, an independent copy (the model is not
    changed) mapping the normalised ``N x C x H x W`` batch to ``N x classes x h x w``
    probabilities (``softmax=False``: the model's own output kind, logits or
    probabilities). *window* is the sliding pooling window in feature cells for
    global-pooling heads: ``"native"`` (the feature-map size at the native input, so
    the native input gives one cell equal to the classifier) or an int (1 = one
    classification per feature-map cell). With *check* (default) the conversion is
    verified numerically on random input; a head that cannot be converted raises
    :class:`~deepfeat.errors.ModelError` naming the operation in the way.
    """
    if not isinstance(model, Model):
        raise UsageError(f"fully_convolutional needs a deepfeat Model (from load_model), got {type(model).__name__}")
    if window != "native":
        try:
            ok = int(window) >= 1 and float(window) == int(window)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"window must be 'native' or a positive number of feature cells, not {window!r}")
        window = int(window)
    net = model.net
    if not isinstance(net, nn.Module) or getattr(model, "tapper", None) is not None:
        raise ModelError(f"{model.spec}: the {model.source} model does not run as PyTorch layers deepfeat can "
                         "rewrite; load the same network from a PyTorch or Caffe source for net surgery")
    arch = model.arch
    native = tuple(model.data_config.input_size)
    was_training = net.training
    net.eval()
    try:
        work = copy.deepcopy(net).eval()
    finally:
        net.train(was_training)
    caffe = _caffe_classes()
    probs_out = model.output_kind == "probs"
    add_softmax = softmax and not probs_out
    kind_of_output = "probs" if (softmax or probs_out) else "logits"
    if caffe is not None and isinstance(work, caffe[0]):
        body, used_window, kind = _convert_caffe(work, model, window)
        dense = DenseClassifier(body, nn.Identity(), softmax=add_softmax, output_kind=kind_of_output,
                                native_size=native, window=used_window, kind=kind, arch=arch, window_mode=window)
        head_gm = fmap_shape = None
    else:
        if hasattr(work, "forward_features") and hasattr(work, "forward_head"):
            trunk, head_gm = _split_timm(work, model)
        else:
            trunk, head_gm = _split_fx(work, model)
        fmap_shape = _shape(next(iter(head_gm.graph.nodes)))
        head, used_window, kind = _convert_head(head_gm, window, arch)
        if hasattr(work, "reset_classifier") and isinstance(trunk, _ForwardFeatures):
            try:  # the converted head holds the classifier now; keep the trunk lean
                work.reset_classifier(0)
            except Exception as e:  # noqa: BLE001 - an exotic timm head; the extra weights are harmless
                log.debug("%s: reset_classifier(0) failed (%s); the trunk keeps the unused classifier", arch, e)
        dense = DenseClassifier(trunk, head, softmax=add_softmax, output_kind=kind_of_output,
                                native_size=native, window=used_window, kind=kind, arch=arch, window_mode=window)
    dense.eval()
    if check:
        if window == "native":
            _check_native(dense, model)
        if head_gm is not None and fmap_shape is not None:
            _check_sliding(head_gm, dense.head, fmap_shape, used_window, arch)
    return dense


# ---------------------------------------------------------------------------
# Dense maps of images
# ---------------------------------------------------------------------------


def _short(label: str) -> str:
    return label.split(",")[0].strip()


@dataclass
class DenseMap:
    """Class probabilities per cell of a dense (fully convolutional) classification.

    ``probs`` is ``classes x h x w`` float32; :attr:`argmax` the top class per cell,
    :attr:`top_prob` its probability. ``input_size`` is the (H, W) fed to the network,
    ``native_size`` the (H, W) at which the map is one cell. ``pixels`` is the input
    image (uint8 H x W x C) for drawing; it is not part of :meth:`to_dict`.
    """

    probs: np.ndarray
    labels: list[str] | None
    input_size: tuple[int, int]
    native_size: tuple[int, int]
    model: str = ""
    image: str | None = None
    arch: str = ""
    pixels: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.probs.shape[1]), int(self.probs.shape[2])

    @property
    def argmax(self) -> np.ndarray:
        return self.probs.argmax(axis=0)

    @property
    def top_prob(self) -> np.ndarray:
        return self.probs.max(axis=0)

    def label(self, index: int) -> str:
        if self.labels is not None and 0 <= index < len(self.labels):
            return self.labels[index]
        return f"class {index}"

    def class_counts(self) -> list[tuple[int, int]]:
        """(class, number of cells where it is the top class), most cells first."""
        idx, counts = np.unique(self.argmax, return_counts=True)
        order = sorted(zip(idx.tolist(), counts.tolist()), key=lambda t: (-t[1], t[0]))
        return order

    def to_dict(self) -> dict[str, Any]:
        top = self.top_prob
        am = self.argmax
        classes = []
        for c, n in self.class_counts():
            sel = am == c
            classes.append({"index": int(c), "label": self.label(c), "cells": int(n),
                            "max_prob": round(float(top[sel].max()), 6)})
        return {
            "model": self.model,
            "arch": self.arch,
            "image": self.image,
            "input_size": list(self.input_size),
            "native_size": list(self.native_size),
            "map_shape": list(self.shape),
            "argmax": am.tolist(),
            "top_prob": np.round(top, 6).tolist(),
            "classes": classes,
        }

    def grid_text(self, names: bool = False, width: int = 12, max_classes: int = 12) -> str:
        """The argmax grid as text: class indices (or short label names, *names*,
        cut to *width* characters), then the legend of the classes that appear, most
        cells first (at most *max_classes* lines)."""
        h, w = self.shape
        am = self.argmax
        lines = [(f"{self.image or 'image'}: {h} x {w} dense map from a {self.input_size[0]} x {self.input_size[1]} "
                 f"input (native {self.native_size[0]} x {self.native_size[1]}), {self.arch or self.model}"),
                 "top class per cell:"]
        iw = max(len(str(int(am.max()))), 1)
        if names:
            cells = [[_short(self.label(int(c)))[:width] for c in row] for row in am]
            cw = max(len(s) for row in cells for s in row)
            lines += ["  " + " ".join(s.ljust(cw) for s in row).rstrip() for row in cells]
        else:
            lines += ["  " + " ".join(str(int(c)).rjust(iw) for c in row) for row in am]
        counts = self.class_counts()
        lines.append("classes (cells, max probability):")
        top = self.top_prob
        for c, n in counts[:max_classes]:
            lines.append(f"  {c:>{iw}}  {self.label(c)}  ({n} cell{'s' if n != 1 else ''}, "
                         f"max {float(top[am == c].max()):.3f})")
        if len(counts) > max_classes:
            rest = counts[max_classes:]
            lines.append(f"  ... and {len(rest)} more classes in {sum(n for _, n in rest)} cells")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.grid_text()


def _size_policy(size: int | str | Any | None):
    from .preprocess import SizePolicy, parse_size_policy

    if size is None:
        return SizePolicy("model")
    if isinstance(size, SizePolicy):
        return size
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        if size <= 0:
            raise UsageError(f"size must be positive, not {size}")
        return SizePolicy("warp", int(size))
    s = str(size).strip()
    if s.isdigit():
        return SizePolicy("warp", int(s))
    return parse_size_policy(s)


def load_pixels(model: Model, image: Any, size: int | str | Any | None = None) -> tuple[np.ndarray, str | None]:
    """Pixels for *model* from a path, a :class:`~deepfeat.images.DecodedImage` or a uint8
    ``H x W x C`` array, resized by *size*: ``None`` = the model's own resize + crop
    (arrays are then used as they are), an int S = warp to S x S (as the classic
    net-surgery example does), or a size policy string (``short:448``, ``long:640``,
    ``warp:HxW``, ``native``)."""
    from PIL import Image

    from .images import DecodedImage, decode_image
    from .preprocess import resize_image

    policy = _size_policy(size)
    if isinstance(image, (str, os.PathLike)):
        return decode_image(image, policy, model.data_config).pixels, os.path.basename(os.fspath(image))
    if isinstance(image, DecodedImage):
        pixels, name = image.pixels, None
    elif isinstance(image, np.ndarray):
        pixels, name = image, None
    else:
        raise UsageError(f"an image must be a path, a DecodedImage or a uint8 H x W x C array, "
                         f"not {type(image).__name__}")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise UsageError(f"image pixels must be uint8 H x W x C with C = 1 or 3, got {pixels.dtype} "
                         f"{tuple(pixels.shape)}")
    if size is not None:
        img = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        pixels = np.array(resize_image(img, policy, model.data_config), dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
    return pixels, name


def dense_map(model: Model, image: Any, size: int | str | Any | None = None, *, window: str | int = "native",
              net: DenseClassifier | None = None, name: str | None = None) -> DenseMap:
    """Classify every window of *image* with the fully convolutional form of *model*.

    *image* is a path, a decoded image or uint8 pixels; *size* as in
    :func:`load_pixels` (``None``: the model's native input, a 1 x 1 map equal to
    :func:`deepfeat.classify.classify`; ``451`` with CaffeNet: the classic 8 x 8 map).
    Pass *net* (from :func:`fully_convolutional`) to reuse one conversion for many
    images (*window* is then the one *net* was built with).
    """
    pixels, found = load_pixels(model, image, size)
    if net is None:
        net = fully_convolutional(model, window=window)
    h, w = int(pixels.shape[0]), int(pixels.shape[1])
    nh, nw = net.native_size
    if net.min_input is not None and (h < nh or w < nw):
        raise UsageError(f"the input is {h} x {w} but the model's classifier window needs at least its native "
                         f"input size {nh} x {nw}; use a larger --size")
    x = torch.from_numpy(np.ascontiguousarray(pixels))[None]
    try:
        with torch.inference_mode():
            out = net(model.normalize(x.to(model.device))).float()
    except RuntimeError as e:
        raise UsageError(f"the dense network cannot run on a {h} x {w} input ({e}); use a larger size") from None
    if net.output_kind != "probs":
        out = out.softmax(dim=1)
    return DenseMap(
        probs=out[0].cpu().numpy().astype(np.float32),
        labels=list(model.labels) if model.labels is not None else None,
        input_size=(h, w),
        native_size=(nh, nw),
        model=model.spec,
        image=name or found,
        arch=model.arch,
        pixels=pixels,
    )
