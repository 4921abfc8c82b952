"""Net surgery on a :class:`~deepfeat.models.caffe.net.CaffeNet`, layer by layer: its
InnerProduct layers become convolutions (``fc6`` -> 6x6, later ones 1x1), its
Flatten layers identities and a global pooling a sliding window. No tracing is
needed: the net's children are its Caffe layers, in order.
"""

from __future__ import annotations

import torch
from torch import nn

from deepfeat.errors import ModelError, UsageError
from deepfeat.models.base import Model
from deepfeat.surgery.checks import _native_input
from deepfeat.surgery.modules import _pair, _window_pool, linear_to_conv


def _caffe_classes():
    try:
        from deepfeat.models.caffe.layers import Flatten, InnerProduct, Pooling, Reshape
        from deepfeat.models.caffe.net import CaffeNet
    except ImportError:  # the caffe source is not part of this installation
        return None
    return CaffeNet, InnerProduct, Flatten, Pooling, Reshape


def _global_pool_inputs(net: nn.Module, model: Model, pooling: type) -> dict[str, tuple[int, ...]]:
    """The input shape of each global pooling layer at the native input size."""
    pool_inputs: dict[str, tuple[int, ...]] = {}
    handles = []

    def record(name: str):
        def hook(_m, args) -> None:
            pool_inputs.setdefault(name, tuple(args[0].shape))

        return hook

    for name, m in net.named_children():
        if isinstance(m, pooling) and m.global_pooling:
            handles.append(m.register_forward_pre_hook(record(name)))
    try:
        if handles:
            with torch.no_grad():
                net(_native_input(model))
    finally:
        for h in handles:
            h.remove()
    return pool_inputs


def _fc_as_conv(m: nn.Module, arch: str, window: str | int, pooled: bool) -> tuple[nn.Conv2d, tuple[int, int] | None]:
    """An InnerProduct layer as a convolution, and its window (h, w) when it is a
    k x k convolution over the feature map (None for 1 x 1)."""
    if m.axis != 1:
        raise ModelError(f"{arch}: InnerProduct layer '{m.label}' flattens from axis {m.axis}, not 1; "
                         "only axis-1 layers have a convolutional form")
    fc_window = None
    if len(m.in_shape) == 3 and m.in_shape[1] * m.in_shape[2] > 1:
        if window != "native" and not pooled:
            raise UsageError(f"{arch}: '{m.label}' is a {m.in_shape[1]} x {m.in_shape[2]} convolution over "
                             f"the feature map; window={window!r} applies only to global-pooling heads")
        fc_window = (m.in_shape[1], m.in_shape[2])
    shape = tuple(m.in_shape)
    if len(shape) not in (1, 3):
        raise ModelError(f"{arch}: InnerProduct layer '{m.label}' reads a {len(shape)}-D input; only "
                         "C x H x W maps and vectors have a convolutional form")
    c, h, w = shape if len(shape) == 3 else (shape[0], 1, 1)
    return linear_to_conv(m, c, (h, w)), fc_window  # what InnerProduct.as_conv2d does, without the init


def _convert_caffe(net: nn.Module, model: Model, window: str | int) -> tuple[nn.Module, tuple[int, int] | None, str]:
    """Replace a CaffeNet's InnerProduct layers by convolutions (``fc6`` -> 6x6, later ones
    1x1), its Flatten layers by identities and a global pooling by a sliding window."""
    _CaffeNet, InnerProduct, Flatten, Pooling, Reshape = _caffe_classes()  # type: ignore[misc]
    arch = model.arch
    pool_inputs = _global_pool_inputs(net, model, Pooling)
    used_window: tuple[int, int] | None = None
    kind = None
    pooled = False
    for name, m in list(net.named_children()):
        if isinstance(m, InnerProduct):
            conv, fc_window = _fc_as_conv(m, arch, window, pooled)
            if fc_window is not None:
                used_window = used_window or fc_window
                kind = kind or "fc"
            setattr(net, name, conv)
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
