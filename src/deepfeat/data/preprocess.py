"""Preprocessing that travels with the model.

A :class:`DataConfig` says how the network was trained to see images (input size,
resize and crop, interpolation, channel order, pixel scale, mean and std or a mean
image). It is resolved from the model itself (timm ``pretrained_cfg``, torchvision
weight transforms, the Caffe deploy file) and never re-typed by callers.

Geometry (resize/crop, done on uint8 images in the decode workers) and
normalisation (done on the batch tensor, inside the network wrapper so that it is
part of an exported ONNX graph too) are separate steps:

* :func:`parse_size_policy` / :func:`target_size` / :func:`resize_image` decide and
  apply the geometry for one of the size policies (``model``, ``short:S``,
  ``long:S``, ``warp:S``, ``native``);
* :class:`deepfeat.data.normalize.Normalize` turns an ``N x H x W x C`` uint8 batch into
  the float ``N x C x H x W`` tensor the network expects.

This module does not import torch, so decode worker processes start fast.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from deepfeat.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class DataConfig:
    """How a network expects its input.

    ``scale`` multiplies uint8 pixels before ``mean``/``std`` are applied, so a
    PyTorch-style model has ``scale=1/255`` and a Caffe model ``scale=1.0`` with
    means in 0..255 units. ``resize_mode`` is ``"shorter"`` (resize the shorter side
    to ``input/crop_pct`` keeping aspect, then centre-crop: timm/torchvision) or
    ``"warp"`` (resize both sides to ``input/crop_pct``, then centre-crop: Caffe's
    classic 256x256 -> 227 flow). ``mean_image`` is an optional ``C x H x W`` array
    (channel order and units as the network's input) subtracted after centre
    cropping it to the input size, as Caffe's ``mean.binaryproto`` is.
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    resize_mode: str = "shorter"
    fixed_input_size: bool = False
    #: aspect-preserving sizes are rounded to a multiple of this (a transformer's patch size), 1: not rounded
    size_multiple: int = 1
    mean_image: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR", "L"):
            raise UsageError(f"channel_order must be RGB, BGR or L, not {self.channel_order!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise UsageError(
                f"interpolation {self.interpolation!r} unknown; choose from {', '.join(INTERPOLATIONS)}"
            )
        if self.resize_mode not in ("shorter", "warp"):
            raise UsageError(f"resize_mode must be 'shorter' or 'warp', not {self.resize_mode!r}")
        if not 0 < self.crop_pct <= 1:
            raise UsageError(f"crop_pct must be in (0, 1], not {self.crop_pct}")

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (the mean image is summarised, not dumped)."""
        d = asdict(self)
        d.pop("mean_image")
        if d["size_multiple"] == 1:  # recorded only where it matters (patch sizes), so metas stay as they were
            d.pop("size_multiple")
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if self.mean_image is not None:
            d["mean_image_shape"] = list(self.mean_image.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], mean_image: np.ndarray | None = None) -> "DataConfig":
        d = dict(d)
        d.pop("mean_image_shape", None)
        d["input_size"] = tuple(d["input_size"])
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d, mean_image=mean_image)

    def with_overrides(self, **kw: Any) -> "DataConfig":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


# ---------------------------------------------------------------------------
# Size policies
# ---------------------------------------------------------------------------

SIZE_POLICIES = ("model", "short", "long", "warp", "native")


@dataclass(frozen=True)
class SizePolicy:
    """Where the pixels that reach the network come from.

    * ``model``: the model's own resize + centre crop (fixed size, for classification);
    * ``short:S``: resize so the shorter side is S, aspect kept, no crop;
    * ``long:S``: resize so the longer side is S, aspect kept, no crop (the retrieval
      standard, e.g. ``long:1024`` for Oxford/Paris);
    * ``warp:S`` or ``warp:HxW``: resize to exactly S x S (or H x W), aspect not kept;
    * ``native``: the image as it is.
    """

    kind: str = "model"
    size: tuple[int, int] | int | None = None

    def __str__(self) -> str:
        if self.kind in ("model", "native"):
            return self.kind
        if isinstance(self.size, tuple):
            return f"{self.kind}:{self.size[0]}x{self.size[1]}"
        return f"{self.kind}:{self.size}"

    @property
    def fixed(self) -> bool:
        """True when every image comes out at the same size."""
        return self.kind in ("model", "warp")


#: PIL's decompression-bomb limit; a size policy whose smallest output is larger can resize no image
PIL_MAX_PIXELS = 178_956_970


def parse_size_policy(text: str | SizePolicy | None) -> SizePolicy:
    """Parse ``model``, ``native``, ``short:S``, ``long:S``, ``warp:S`` or ``warp:HxW``."""
    if isinstance(text, SizePolicy):
        return text
    if text is None or text == "":
        return SizePolicy("model")
    text = str(text).strip().lower()
    if text in ("model", "native"):
        return SizePolicy(text)
    kind, sep, arg = text.partition(":")
    if kind not in SIZE_POLICIES or not sep:
        raise UsageError(
            f"size policy {text!r} not understood; use one of: model, native, short:S, long:S, warp:S, warp:HxW"
        )
    try:
        if kind == "warp" and "x" in arg:
            h, w = (int(v) for v in arg.split("x"))
            size: tuple[int, int] | int = (h, w)
            if h <= 0 or w <= 0:
                raise ValueError
        else:
            size = int(arg)
            if size <= 0:
                raise ValueError
    except ValueError:
        raise UsageError(f"size policy {text!r}: the size must be a positive integer (or HxW for warp)") from None
    least = size[0] * size[1] if isinstance(size, tuple) else size * size  # long:S and short:S: at least S x S
    if least > PIL_MAX_PIXELS:
        raise UsageError(f"size policy {text!r} resizes every image to at least {least:,} pixels, over the "
                         f"{PIL_MAX_PIXELS:,} an image may have: every image would fail (at most "
                         f"{kind}:{math.isqrt(PIL_MAX_PIXELS)})")
    return SizePolicy(kind, size)


def resize_for_model(width: int, height: int, cfg: DataConfig) -> tuple[int, int]:
    """(W, H) to resize to before the model's centre crop (timm/torchvision semantics)."""
    th, tw = cfg.input_size
    if cfg.resize_mode == "warp":
        return max(1, math.floor(tw / cfg.crop_pct)), max(1, math.floor(th / cfg.crop_pct))
    if th == tw:
        scale_size = math.floor(th / cfg.crop_pct)
        if width <= height:
            return scale_size, max(1, int(scale_size * height / width))
        return max(1, int(scale_size * width / height)), scale_size
    sh, sw = math.floor(th / cfg.crop_pct), math.floor(tw / cfg.crop_pct)
    return sw, sh


def target_size(width: int, height: int, policy: SizePolicy, cfg: DataConfig) -> tuple[int, int]:
    """The (W, H) an image of *width* x *height* is resized to (before any crop)."""
    if policy.kind == "model":
        return resize_for_model(width, height, cfg)
    if policy.kind == "native":
        return width, height
    if policy.kind == "warp":
        if isinstance(policy.size, tuple):
            return policy.size[1], policy.size[0]
        return int(policy.size), int(policy.size)  # type: ignore[arg-type]
    s = int(policy.size)  # type: ignore[arg-type]
    ref = min(width, height) if policy.kind == "short" else max(width, height)
    f = s / ref
    m = max(1, int(cfg.size_multiple))
    return max(m, round(width * f / m) * m), max(m, round(height * f / m) * m)


def draft_request(width: int, height: int, policy: SizePolicy, cfg: DataConfig) -> tuple[int, int] | None:
    """The smallest (W, H) a JPEG may be DCT-downscaled to without losing resolution."""
    if policy.kind == "native":
        return None
    return target_size(width, height, policy, cfg)


def center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Centre crop to (H, W); pads nothing, the image must be at least that big."""
    th, tw = size
    w, h = img.size
    left = int(round((w - tw) / 2.0))
    top = int(round((h - th) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def resize_image(img: Image.Image, policy: SizePolicy, cfg: DataConfig,
                 source_size: tuple[int, int] | None = None) -> Image.Image:
    """Apply the geometry of *policy* to a decoded PIL image (mode RGB or L).

    *source_size* is the (W, H) of the image at full resolution when *img* was decoded
    smaller (JPEG draft): the output size is computed from it, so it is exactly the size
    predicted from the file's header, whatever DCT scale the decoder chose. (Resampling
    only the centre crop with ``resize(box=...)`` would be faster but differs from
    timm/torchvision's resize-then-crop by up to 3 grey levels, so it is not done.)
    """
    sw, sh = source_size or img.size
    tw, th = target_size(sw, sh, policy, cfg)
    if (tw, th) != img.size:
        img = img.resize((tw, th), INTERPOLATIONS[cfg.interpolation])
    if policy.kind == "model":
        img = center_crop(img, cfg.input_size)
    return img
