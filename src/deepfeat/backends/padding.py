"""Batches of images of different sizes: padding to a few bucket shapes, and masked pooling.

deepfeat's default batches hold images of exactly one shape, so every descriptor is the one
the image gets on its own. On a GPU many small batches waste the device; padding images to a
common *bucket* shape (each side rounded up to a multiple) makes full batches. Two things
change with padding, and only one of them can be undone:

* the **pooling** would also see the padded positions of the feature map. For the poolings
  where a mask is defined (:data:`MASKABLE`: ``sum``, ``avg``, ``spoc`` without centre prior,
  ``mac``, ``gem``) :func:`masked_pool` pools the valid positions only, and equals the
  pooling of the unpadded map exactly (tests/test_fast_extract.py). The others (``rmac``,
  ``rgem``, ``crow``, ``spoc`` with its centre prior, ``mop``, concatenations of them)
  depend on the map's size or on every position, and are refused (:func:`check_maskable`);
* the **network** itself: convolutions near the image's right and bottom border see padding
  (zeros in normalised space, what the network's own zero padding would show the first
  layer) instead of their own border handling, so border activations differ slightly. That
  is not undone; docs/benchmarks.md ("Padded batches and masked pooling") gives the cosine to
  unpadded descriptors.
  Padding is therefore opt-in (``--pad-to``), never the default.

All of this is device-agnostic torch, tested on the CPU; :class:`PaddedTorchRunner` is meant
for CUDA, where full batches pay.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from deepfeat.errors import UsageError
from deepfeat.pooling import EPS, combine_scales, l2_normalize, rescale

MASKABLE = ("sum", "avg", "spoc", "mac", "gem")


def bucket_shape(h: int, w: int, multiple: int) -> tuple[int, int]:
    """(H, W) rounded up to multiples of *multiple* (a network's total stride, e.g. 32, keeps the grid aligned)."""
    m = max(1, int(multiple))
    return int(math.ceil(h / m) * m), int(math.ceil(w / m) * m)


def check_maskable(pooling) -> None:
    """Raise :class:`UsageError` unless *pooling* can pool a padded map exactly (:data:`MASKABLE`)."""
    name = getattr(pooling, "name", str(pooling))
    params = getattr(pooling, "params", {}) or {}
    if name not in MASKABLE or (name == "spoc" and params.get("center_prior")):
        what = "spoc:center_prior=1" if name == "spoc" else name
        raise UsageError(f"pooling {what!r} cannot pool padded batches exactly (its result depends on the map's "
                         f"size or border); padding works with {', '.join(MASKABLE)} (spoc without centre "
                         "prior). Leave --pad-to out to batch by exact shape instead.")


def check_no_attention(feature_net) -> None:
    """Raise :class:`UsageError` if a tap is a transformer's token sequence: padded patches take part
    in attention and change every token, not only the border (ViT-Ti, GeM: cosine 0.996 to the
    unpadded descriptors, docs/benchmarks.md), so padding would not give the image's own descriptor."""
    layouts = getattr(getattr(feature_net, "taps", None), "layouts", {}) or {}
    tokens = [name for name, layout in layouts.items() if layout.kind == "tokens"]
    if tokens:
        raise UsageError(f"--pad-to: layer {tokens[0]!r} is a transformer's token sequence; padded patches would "
                         "take part in attention and change every token. Leave --pad-to out: images are batched "
                         "by exact shape.")


def valid_map_size(valid_hw: tuple[int, int], input_hw: tuple[int, int], map_hw: tuple[int, int]) -> tuple[int, int]:
    """The part of an ``map_hw`` feature map computed from the top-left ``valid_hw`` of an
    ``input_hw`` input: the positions whose receptive-field centre lies in the valid image,
    ``ceil(valid * map / input)`` (for a stride-s network with 'same' padding, ceil(valid / s):
    the size the unpadded image's own map has)."""
    return tuple(max(1, min(m, int(math.ceil(v * m / i - 1e-9)))) for v, i, m in zip(valid_hw, input_hw, map_hw))


def valid_mask(valid: Sequence[tuple[int, int]], map_hw: tuple[int, int], device=None) -> torch.Tensor:
    """``N x 1 x H x W`` boolean mask, True on the top-left ``valid[i]`` positions of each map."""
    h, w = map_hw
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    vh = torch.tensor([v[0] for v in valid], device=device).view(-1, 1, 1)
    vw = torch.tensor([v[1] for v in valid], device=device).view(-1, 1, 1)
    return ((rows < vh) & (cols < vw)).unsqueeze(1)


def masked_pool(x: torch.Tensor, mask: torch.Tensor, pooling) -> torch.Tensor:
    """Pool ``N x C x H x W`` maps over the positions where ``mask`` (``N x 1 x H x W``) is True,
    with the same result as pooling each map's valid part alone."""
    check_maskable(pooling)
    name = pooling.name
    m = mask.to(x.dtype)
    count = m.sum(dim=(2, 3)).clamp_min(1.0)
    if name in ("sum", "spoc"):
        return (x * m).sum(dim=(2, 3))
    if name == "avg":
        return (x * m).sum(dim=(2, 3)) / count
    if name == "mac":
        return x.masked_fill(~mask, float("-inf")).amax(dim=(2, 3))
    p = float(pooling.params["p"])
    eps = float(pooling.params.get("eps", EPS))
    xc = x.clamp(min=eps)
    mx = xc.masked_fill(~mask, 0.0).amax(dim=(2, 3), keepdim=True)  # valid values are >= eps > 0
    # padded positions are zeroed before the power: large values there must not overflow into NaN
    ratio = torch.where(mask, xc / mx, torch.zeros((), dtype=x.dtype, device=x.device))
    return mx.flatten(1) * ratio.pow(p).sum(dim=(2, 3)).div(count).pow(1.0 / p)


def pad_batch(images: Sequence[torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Normalised ``C x h x w`` images into one ``N x C x H x W`` batch, each top-left, zeros elsewhere."""
    c = images[0].shape[0]
    out = images[0].new_zeros((len(images), c, *shape))
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
    return out


class PaddedTorchRunner:
    """Eager torch on images of several shapes at once: each scale's images are padded to one
    bucket shape (sides rounded up to *multiple*), run as one batch, and pooled with a mask.

    Same output as :class:`~deepfeat.backends.featurenet.TorchRunner` (one list of ``N x D`` arrays per
    layer) up to the border effect of padding inside the network (module docstring). Takes a
    list of ``H x W x C`` uint8 images (:meth:`run_list`).
    """

    name = "torch"

    def __init__(self, feature_net, device, multiple: int = 32, channels_last: bool = True):
        check_maskable(feature_net.pooling)
        check_no_attention(feature_net)
        self.fnet = feature_net.eval()
        self.device = torch.device(device)
        self.multiple = int(multiple)
        self.channels_last = bool(channels_last) and self.device.type == "cuda"
        if self.channels_last:
            self.fnet.net.to(memory_format=torch.channels_last)

    def _one_scale(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        shape = bucket_shape(max(x.shape[1] for x in xs), max(x.shape[2] for x in xs), self.multiple)
        batch = pad_batch(xs, shape)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        acts = self.fnet.taps(batch)
        out = []
        for name in self.fnet.layers:
            a, _prefix = acts[name]  # padded batches hold maps (check_maskable: no token poolings)
            valid = [valid_map_size(tuple(x.shape[1:]), shape, tuple(a.shape[2:])) for x in xs]
            out.append(masked_pool(a, valid_mask(valid, tuple(a.shape[2:]), a.device), self.fnet.pooling))
        return out

    def run_list(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        fnet = self.fnet
        with torch.inference_mode():
            xs = [fnet.normalize(torch.from_numpy(np.ascontiguousarray(im))[None].to(self.device))[0]
                  for im in images]
            single = len(fnet.scales) == 1 and fnet.scales[0] == 1.0
            if single:
                outs = self._one_scale(xs)
            else:  # as Pooling.multiscale for global poolings: L2 per scale, combine, L2
                per_scale = [self._one_scale([x if s == 1.0 else rescale(x[None], s)[0] for x in xs])
                             for s in fnet.scales]
                outs = [l2_normalize(combine_scales([l2_normalize(ps[i]) for ps in per_scale],
                                                    fnet.scale_combine, fnet.scale_p))
                        for i in range(len(fnet.layers))]
        return [o.float().cpu().numpy() for o in outs]

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        return self.run_list(list(pixels))
