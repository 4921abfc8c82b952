"""The pieces a dense classifier is made of: FC weights as convolution weights, the
small saveable modules of converted heads (no closures, so ``torch.save`` works),
and :class:`DenseClassifier` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deepfeat.errors import UsageError

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


_ELEMENTWISE_FUNCS = frozenset({
    "relu", "relu6", "relu_", "hardswish", "hardsigmoid", "silu", "gelu", "sigmoid", "tanh", "elu", "selu",
    "celu", "leaky_relu", "mish", "softplus", "hardtanh",
})


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



def _window_pool(kind: str, k: tuple[int, int]) -> nn.Module:
    return nn.AvgPool2d(k, stride=1) if kind == "avg" else nn.MaxPool2d(k, stride=1)

