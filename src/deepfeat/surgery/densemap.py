"""Dense maps of images: :func:`dense_map` runs a :class:`~.modules.DenseClassifier`
on one image and returns a :class:`DenseMap` (probabilities per cell, the argmax
grid, the top-class probability map, labels, a text rendering).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from deepfeat.errors import UsageError
from deepfeat.models.base import Model
from deepfeat.surgery.convert import fully_convolutional
from deepfeat.surgery.modules import DenseClassifier
from deepfeat.surgery.pixels import load_pixels


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


def dense_map(model: Model, image: Any, size: int | str | Any | None = None, *, window: str | int = "native",
              net: DenseClassifier | None = None, name: str | None = None) -> DenseMap:
    """Classify every window of *image* with the fully convolutional form of *model*.

    *image* is a path, a decoded image or uint8 pixels; *size* as in
    :func:`load_pixels` (``None``: the model's native input, a 1 x 1 map equal to
    :func:`deepfeat.models.classify.classify`; ``451`` with CaffeNet: the classic 8 x 8 map).
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
