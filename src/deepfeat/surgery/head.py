"""Converting a traced classifier head into convolutional modules, op by op.

The head graph (placeholder = feature map, shapes propagated at the native size)
must be a simple chain. Each node is mapped to its dense form: a global pooling
becomes a sliding pool over a window of feature cells, a flatten is dropped, a
Linear layer becomes a k x k (first after a flatten) or 1 x 1 convolution,
activations, dropout, BatchNorm, LayerNorm over channels, channel permutes and a
softmax over classes carry over. Anything else raises
:class:`~deepfeat.errors.ModelError` naming the operation in the way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deepfeat.errors import ModelError, UsageError
from deepfeat.surgery.fxnodes import (
    _arg,
    _class_axis,
    _describe,
    _dims,
    _fn_name,
    _is_activation,
    _is_flatten,
    _is_tensor_node,
    _pool_kind,
    _shape,
    _tensor_inputs,
    _tensor_users,
)
from deepfeat.surgery.modules import (
    _ELEMENTWISE_FUNCS,
    ChannelLayerNorm,
    Elementwise,
    _pair,
    _window_pool,
    linear_to_conv,
)

_ELEMENTWISE_METHODS = frozenset({"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"})
_LAYOUT_METHODS = frozenset({"contiguous"})
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)


@dataclass
class _Head:
    """The conversion so far: the dense modules, and what the original head's value is now."""

    gm: Any
    window: str | int
    arch: str
    channels: int
    out: list[nn.Module] = field(default_factory=list)
    ndim: int = 4  # rank of the value in the *original* head
    flat: tuple[int, int, int] | None = None  # (C, h, w) flattened and not yet consumed by an FC layer
    layout: str = "nchw"
    used_window: tuple[int, int] | None = None
    pooled: bool = False
    kind: str = "fc"

    def fail(self, node, why: str) -> ModelError:
        return ModelError(f"{self.arch}: cannot cast the classifier as convolutions: {_describe(node)} {why}")

    def fc_input(self, node, in_features: int) -> tuple[int, int, int]:
        """The (C, h, w) map a fully connected layer of *in_features* inputs reads."""
        c, h, w = self.flat if self.flat is not None else (self.channels, 1, 1)
        if c * h * w != in_features:
            raise self.fail(node, f"takes {in_features} inputs but gets {c} x {h} x {w}")
        return c, h, w

    def softmax(self, node, dim: Any) -> None:
        if not _class_axis(dim, self.ndim):
            raise self.fail(node, f"is a softmax over axis {dim}, not the class axis")
        self.out.append(nn.Softmax(dim=1))


def _param(gm, arg: Any):
    return gm.get_parameter(arg.target) if hasattr(arg, "target") else None


def _pool(st: _Head, node, pool: str, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> None:
    if st.pooled:
        raise st.fail(node, "is a second pooling after the global one")
    if len(y_shape) == 4 and y_shape[2:] == x_shape[2:]:
        return  # an adaptive pool that is the identity at the native size (AlexNet/VGG)
    if len(y_shape) == 2 or y_shape[2:] == (1, 1):
        k = (x_shape[2], x_shape[3]) if st.window == "native" else _pair(int(st.window))
        st.out.append(_window_pool(pool, k))
        st.used_window, st.pooled, st.kind = k, True, "global-pool"
        st.channels = x_shape[1]
        if len(y_shape) == 2:
            st.ndim = 2  # pooled to a vector: a 1 x 1 map in the dense form
        return
    raise st.fail(node, f"pools {x_shape[2]} x {x_shape[3]} to {y_shape[2]} x {y_shape[3]} at the native "
                        "input size, which is not a fixed sliding window")


def _flatten(st: _Head, node, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> None:
    if len(x_shape) == 4 and len(y_shape) == 2:
        if st.layout != "nchw":
            raise st.fail(node, "flattens a channels-last map")
        st.channels, st.ndim = x_shape[1], 2
        st.flat = (x_shape[1], x_shape[2], x_shape[3]) if x_shape[2] * x_shape[3] > 1 else None
        return
    if len(x_shape) == len(y_shape):
        return
    raise st.fail(node, f"reshapes {list(x_shape)} to {list(y_shape)}")


def _linear_module(st: _Head, node, m: nn.Linear) -> None:
    if st.ndim != 2:
        raise st.fail(node, "is a Linear layer applied to a 4-D map")
    c, h, w = st.fc_input(node, m.in_features)
    if h * w > 1 and st.window != "native":
        raise UsageError(f"{st.arch}: the classifier is a {h} x {w} convolution over the feature map; "
                         f"window={st.window!r} applies only to global-pooling heads")
    st.out.append(linear_to_conv(m, c, (h, w)))
    st.channels, st.flat = m.out_features, None
    if h * w > 1:
        st.used_window = (h, w)


def _module(st: _Head, node, x_shape: tuple[int, ...]) -> None:
    m = st.gm.get_submodule(node.target)
    if isinstance(m, nn.Linear):
        _linear_module(st, node, m)
    elif isinstance(m, nn.Softmax):  # before the activations: a softmax must be over the class axis
        st.softmax(node, m.dim)
    elif isinstance(m, _DROPOUTS) or _is_activation(m) or (isinstance(m, nn.BatchNorm2d) and st.ndim == 4):
        st.out.append(copy.deepcopy(m))
    elif isinstance(m, nn.BatchNorm1d) and st.ndim == 2 and st.flat is None:
        bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        bn.load_state_dict(m.state_dict())
        st.out.append(bn.to(next(m.parameters(), torch.empty(0)).device))
    elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and (
            (st.ndim == 2 and st.flat is None) or (st.ndim == 4 and st.layout == "nhwc")):
        st.out.append(ChannelLayerNorm(m.normalized_shape[0], m.weight, m.bias, m.eps))
    elif isinstance(m, nn.Conv2d) and st.ndim == 4 and x_shape[2:] == (1, 1) and m.kernel_size == (1, 1) \
            and m.stride == (1, 1) and m.padding in ((0, 0), "valid"):
        st.out.append(copy.deepcopy(m))
        st.channels = m.out_channels
    else:
        raise st.fail(node, f"({type(m).__name__}) has no convolutional form deepfeat knows")


def _function(st: _Head, node, x_shape: tuple[int, ...]) -> None:
    name = _fn_name(node.target)
    if name == "linear":
        if st.ndim != 2:
            raise st.fail(node, "is a linear map applied to a 4-D map")
        weight, bias = _param(st.gm, _arg(node, 1, "weight")), _param(st.gm, _arg(node, 2, "bias"))
        if weight is None:
            raise st.fail(node, "has no parameter weight")
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if bias is not None:
                lin.bias.copy_(bias)
        c, h, w = st.fc_input(node, lin.in_features)
        st.out.append(linear_to_conv(lin.to(weight.device), c, (h, w)))
        st.channels, st.flat = lin.out_features, None
    elif name == "dropout":
        return  # identity at inference
    elif name in _ELEMENTWISE_FUNCS:
        extra = {k: v for k, v in node.kwargs.items() if k != "inplace"}
        if len(node.args) > 1:
            raise st.fail(node, "has positional arguments deepfeat does not map")
        st.out.append(Elementwise(name.rstrip("_"), extra))
    elif name == "layer_norm" and st.ndim == 4 and st.layout == "nhwc":
        ns = _dims(_arg(node, 1, "normalized_shape"))
        eps = _arg(node, 4, "eps", 1e-5)
        if ns != (x_shape[3],):
            raise st.fail(node, "normalises over more than the channel axis")
        weight, bias = _param(st.gm, _arg(node, 2, "weight")), _param(st.gm, _arg(node, 3, "bias"))
        st.out.append(ChannelLayerNorm(ns[0], weight, bias, eps))
    elif name == "softmax":
        st.softmax(node, _arg(node, 1, "dim"))
    else:
        raise st.fail(node, "has no convolutional form deepfeat knows")


def _method(st: _Head, node, x_shape: tuple[int, ...]) -> None:
    name = str(node.target)
    if name in _LAYOUT_METHODS:
        return
    if name == "permute" and st.ndim == 4:
        dims = _dims(node.args[1:] if len(node.args) > 2 else _arg(node, 1, "dims"))
        if dims == (0, 2, 3, 1) and st.layout == "nchw":
            st.layout = "nhwc"
        elif dims == (0, 3, 1, 2) and st.layout == "nhwc":
            st.layout = "nchw"
        else:
            raise st.fail(node, f"permutes the axes as {dims}")
    elif name in _ELEMENTWISE_METHODS:
        st.out.append(Elementwise(name.rstrip("_")))
    elif name == "softmax":
        st.softmax(node, _arg(node, 1, "dim"))
    else:
        raise st.fail(node, "has no convolutional form deepfeat knows")


_STEPS = {"call_module": _module, "call_function": _function, "call_method": _method}


def _convert_node(st: _Head, node) -> None:
    x_shape = _shape(_tensor_inputs(node)[0])
    y_shape = _shape(node)
    if x_shape is None or y_shape is None:
        raise st.fail(node, "did not produce a tensor")
    pool = _pool_kind(node, st.gm)
    if pool is not None and len(x_shape) == 4:
        _pool(st, node, pool, x_shape, y_shape)
    elif _is_flatten(node, st.gm):
        _flatten(st, node, x_shape, y_shape)
    elif node.op in _STEPS:
        _STEPS[node.op](st, node, x_shape)
    else:
        raise st.fail(node, "has no convolutional form deepfeat knows")


def _head_chain(gm, arch: str) -> list:
    """The head's tensor nodes (placeholder first, output last), checked to be a simple chain."""
    nodes = [n for n in gm.graph.nodes if n.op == "output" or _is_tensor_node(n)]
    if not nodes or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        raise ModelError(f"{arch}: the classifier head could not be read")
    prev = nodes[0]
    for node in nodes[1:]:
        ins = _tensor_inputs(node)
        if len(ins) != 1 or ins[0] is not prev or len(_tensor_users(prev)) != 1:
            raise ModelError(
                f"{arch}: the classifier head is not a simple chain of layers after the feature map "
                f"({_describe(node)} combines several values), so it has no convolutional form"
            )
        prev = node
    return nodes


def _convert_head(gm, window: str | int, arch: str) -> tuple[nn.Sequential, tuple[int, int] | None, str]:
    """Convert a traced head (placeholder = feature map, shapes propagated at the
    native size) into convolutional modules. Returns (head, window cells, kind)."""
    nodes = _head_chain(gm, arch)
    fmap = _shape(nodes[0])
    if fmap is None or len(fmap) != 4:
        raise ModelError(f"{arch}: the features before the classifier are not an N x C x H x W map")
    st = _Head(gm, window, arch, channels=fmap[1])
    for node in nodes[1:-1]:
        _convert_node(st, node)
    if st.layout != "nchw":
        raise ModelError(f"{arch}: the classifier head ends in a channels-last layout")
    if st.flat is not None and (st.flat[1] * st.flat[2] > 1):
        raise ModelError(f"{arch}: the head flattens the feature map but no fully connected layer follows")
    if not st.pooled and st.used_window is None and st.kind == "fc":
        raise ModelError(f"{arch}: no global pooling or flattening found before the classifier")
    if window != "native" and not st.pooled:
        raise UsageError(f"{arch}: window={window!r} applies only to global-pooling heads")
    return nn.Sequential(*st.out), st.used_window, st.kind
