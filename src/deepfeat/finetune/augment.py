"""Augmentation of fine-tuning samples, Keras ``ImageDataGenerator`` semantics.

The classic set (rotation, width/height shift, shear, zoom, horizontal flip,
``fill_mode='nearest'``) composed into one affine transform per sample, drawn from a
generator seeded by (seed, epoch, image, copy), so every view is reproducible and
``--save-augmented`` writes exactly what training sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from deepfeat.errors import UsageError

if TYPE_CHECKING:
    from deepfeat.finetune.samples import Sample

#: which samples are augmented (``--augment``): the fill-up copies, all, none
AUGMENT_MODES = ("fill", "all", "none")

FILL_MODES = {"nearest": "border", "reflect": "reflection", "constant": "zeros"}


@dataclass(frozen=True)
class AffineParams:
    """One drawn transform: rotation (degrees), shifts (pixels, rows/cols), shear
    (radians), zoom factors (rows/cols), horizontal flip."""

    theta: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    shear: float = 0.0
    zx: float = 1.0
    zy: float = 1.0
    flip: bool = False


@dataclass(frozen=True)
class Augmentation:
    """The Keras ``ImageDataGenerator`` set, one affine transform per sample.

    ``rotation`` in degrees (``rotation_range``), ``width_shift``/``height_shift`` as
    fractions of the image size, ``shear`` in radians (Keras 1 semantics, the one the
    classic small-data recipe was written for: 0.2 rad ~ 11.5 deg; Keras 2 reads the
    same number as degrees, which is almost no shear), ``zoom`` as the range
    ``[1 - z, 1 + z]`` drawn independently for rows and columns, a horizontal flip with
    probability 1/2, and ``fill`` for points outside the image: ``nearest`` repeats the
    edge pixel as Keras' ``fill_mode='nearest'`` does. Bilinear interpolation, as
    Keras' ``order=1``.
    """

    rotation: float = 10.0
    width_shift: float = 0.2
    height_shift: float = 0.2
    shear: float = 0.2
    zoom: float = 0.2
    horizontal_flip: bool = True
    fill: str = "nearest"

    def __post_init__(self) -> None:
        if self.fill not in FILL_MODES:
            raise UsageError(f"augmentation fill {self.fill!r} unknown; choose {', '.join(FILL_MODES)}")
        for name in ("rotation", "width_shift", "height_shift", "shear", "zoom"):
            if getattr(self, name) < 0:
                raise UsageError(f"augmentation {name} must be >= 0, not {getattr(self, name)}")
        if self.zoom >= 1:
            raise UsageError(f"augmentation zoom must be < 1 (range [1-z, 1+z]), not {self.zoom}")

    def draw(self, rng: np.random.Generator, height: int, width: int) -> AffineParams:
        """Random parameters, drawn in Keras' order (theta, tx, ty, shear, zx, zy, flip)."""
        theta = rng.uniform(-self.rotation, self.rotation) if self.rotation else 0.0
        tx = rng.uniform(-self.height_shift, self.height_shift) * height if self.height_shift else 0.0
        ty = rng.uniform(-self.width_shift, self.width_shift) * width if self.width_shift else 0.0
        shear = rng.uniform(-self.shear, self.shear) if self.shear else 0.0
        if self.zoom:
            zx, zy = rng.uniform(1 - self.zoom, 1 + self.zoom, 2)
        else:
            zx = zy = 1.0
        flip = bool(rng.random() < 0.5) if self.horizontal_flip else False
        return AffineParams(float(theta), float(tx), float(ty), float(shear), float(zx), float(zy), flip)

    def apply(self, pixels: np.ndarray, params: AffineParams) -> np.ndarray:
        """Warp one ``H x W x C`` uint8 image; returns a new uint8 array."""
        return warp_affine(pixels, affine_matrix(params, *pixels.shape[:2]), self.fill, params.flip)

    def to_dict(self) -> dict:
        return {"rotation": self.rotation, "width_shift": self.width_shift, "height_shift": self.height_shift,
                "shear": self.shear, "shear_unit": "radians", "zoom": self.zoom,
                "horizontal_flip": self.horizontal_flip, "fill": self.fill}


def aug_rng(seed: int, epoch: int, index: int, copy: int) -> np.random.Generator:
    """The generator of one sample's transform: a function of (seed, epoch, image, copy) only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(copy)])


def affine_matrix(p: AffineParams, height: int, width: int) -> np.ndarray:
    """3 x 3 matrix mapping output (row, col, 1) to input (row, col, 1), Keras' composition
    ``rotation @ shift @ shear @ zoom`` about the image centre."""
    t = np.deg2rad(p.theta)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    shift = np.array([[1, 0, p.tx], [0, 1, p.ty], [0, 0, 1]])
    shear = np.array([[1, -np.sin(p.shear), 0], [0, np.cos(p.shear), 0], [0, 0, 1]])
    zoom = np.array([[p.zx, 0, 0], [0, p.zy, 0], [0, 0, 1]])
    m = rot @ shift @ shear @ zoom
    oy, ox = (height - 1) / 2.0, (width - 1) / 2.0
    to_c = np.array([[1, 0, oy], [0, 1, ox], [0, 0, 1]])
    from_c = np.array([[1, 0, -oy], [0, 1, -ox], [0, 0, 1]])
    return to_c @ m @ from_c


def warp_affine(pixels: np.ndarray, matrix: np.ndarray, fill: str = "nearest", flip: bool = False) -> np.ndarray:
    """Resample *pixels* (H x W x C uint8) at ``matrix @ (row, col, 1)`` bilinearly, then
    flip horizontally if asked (Keras flips after the affine transform)."""
    import torch
    import torch.nn.functional as F

    h, w = pixels.shape[:2]
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_r = matrix[0, 0] * rr + matrix[0, 1] * cc + matrix[0, 2]
    src_c = matrix[1, 0] * rr + matrix[1, 1] * cc + matrix[1, 2]
    gx = src_c / max(w - 1, 1) * 2 - 1
    gy = src_r / max(h - 1, 1) * 2 - 1
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1).astype(np.float32))[None]
    img = torch.from_numpy(np.require(pixels, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode=FILL_MODES[fill], align_corners=True)
    out = out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def augmented_view(pixels: np.ndarray, aug: Augmentation | None, mode: str, seed: int, epoch: int,
                   sample: Sample) -> np.ndarray:
    """The pixels training sees for *sample* in *epoch*: fill-up copies are always
    augmented (unless mode ``none``), originals only in mode ``all``."""
    if aug is None or mode == "none" or (mode == "fill" and sample.copy == 0):
        return pixels
    rng = aug_rng(seed, epoch, sample.index, sample.copy)
    return aug.apply(pixels, aug.draw(rng, *pixels.shape[:2]))
