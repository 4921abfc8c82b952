"""Pictures glue: the pixels a model sees for a path, a decoded image or an array,
resized by a size (an int to warp to, or a size policy), shared by
:func:`~.densemap.dense_map` and :mod:`deepfeat.viz.network`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.models.base import Model


def _size_policy(size: int | str | Any | None):
    from deepfeat.data.preprocess import SizePolicy, parse_size_policy

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
    """Pixels for *model* from a path, a :class:`~deepfeat.data.images.DecodedImage` or a uint8
    ``H x W x C`` array, resized by *size*: ``None`` = the model's own resize + crop
    (arrays are then used as they are), an int S = warp to S x S (as the classic
    net-surgery example does), or a size policy string (``short:448``, ``long:640``,
    ``warp:HxW``, ``native``)."""
    from PIL import Image

    from deepfeat.data.images import DecodedImage, decode_image
    from deepfeat.data.preprocess import resize_image

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
