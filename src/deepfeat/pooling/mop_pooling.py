"""MOP as a pooling of a feature map: :class:`MOPPooling` (fit, apply, save) and
:func:`load_pooling` for a saved codebook."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from deepfeat.errors import UsageError
from deepfeat.pooling.common import _check_map, l2_normalize
from deepfeat.pooling.global_pool import avg_pool, mac
from deepfeat.pooling.modules import Pooling
from deepfeat.pooling.mop import VLADLevel, mop_windows
from deepfeat.pooling.registry import PoolingKind

MOP_FILE_KIND = "deepfeat.mop-codebook"
MOP_FORMAT_VERSION = 1


class MOPPooling(Pooling):
    """Multi-scale orderless pooling on a feature map (Gong, Wang, Guo & Lazebnik, ECCV 2014).

    Level 1 is the window pooling (MAC or avg) of the whole map; every further
    level takes windows of ``windows[i]`` input pixels every ``step`` pixels
    (:func:`mop_windows`, converted to cells by the layer stride ``cell``, or by
    ``input / map size`` when ``input`` is given), pools each window, and encodes
    the window descriptors with that level's :class:`VLADLevel` (local PCA,
    k-means VLAD, signed sqrt, L2, PCA, L2). Levels are L2-normalised and
    concatenated, scaled by ``1/sqrt(levels)``, so the output has unit norm.

    Must be fitted (:meth:`fit`) on activations of user images, then can be
    saved and loaded (:meth:`save`, :func:`load_pooling`) like a PCA.
    """

    def __init__(self, kind: PoolingKind, params: dict[str, Any]):
        super().__init__(kind, params)
        self.levels = torch.nn.ModuleList()
        self.fit_info: dict[str, Any] = {}
        self.path: str | None = None

    @property
    def fitted(self) -> bool:
        return len(self.levels) == len(self.params["windows"])

    @property
    def l2_normalized(self) -> bool:
        return True

    def output_dim(self, channels: int) -> int:
        if self.fitted:
            return int(channels) + sum(lv.out_dim for lv in self.levels)
        k, local, dim = self.params["k"], self.params["local"], self.params["dim"]
        d = local if 0 < local < channels else channels
        per_level = dim if dim else k * d
        return int(channels) + per_level * len(self.params["windows"])

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["fit"] = dict(self.fit_info)
        d["levels"] = [dict(lv.info) for lv in self.levels]
        d["codebook_path"] = self.path
        return d

    def _cell(self, x: torch.Tensor) -> tuple[float, float]:
        if self.params.get("input"):
            inp = float(self.params["input"])
            return inp / int(x.shape[2]), inp / int(x.shape[3])
        c = float(self.params["cell"])
        return c, c

    def windows(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The ``N x M x C`` window descriptors of every VLAD level of *x*."""
        cell = self._cell(x)
        return [mop_windows(x, w, self.params["step"], cell, self.params["pool"]) for w in self.params["windows"]]

    def fit(self, batches: Iterable[torch.Tensor], max_descriptors: int = 100_000) -> MOPPooling:
        """Learn every level's local PCA, codebook and VLAD PCA from activation batches.

        *batches* yields ``N x C x H x W`` activations of training images (any
        spatial size). Window descriptors are kept in memory (about
        ``windows x C`` floats per image per level), so fit on a sample of a few
        hundred to a few thousand images. Deterministic for a given ``seed``.
        """
        per_level: list[list[np.ndarray]] = [[] for _ in self.params["windows"]]
        channels = None
        n_images = 0
        with torch.no_grad():
            for xb in batches:
                xb = torch.as_tensor(xb)
                _check_map(xb, "mop")
                if channels is not None and xb.shape[1] != channels:
                    raise UsageError(f"MOP training batches have {channels} and {xb.shape[1]} channels")
                channels = int(xb.shape[1])
                for i, w in enumerate(self.windows(xb.float())):
                    per_level[i].append(w.cpu().numpy())
                n_images += int(xb.shape[0])
        if n_images == 0:
            raise UsageError("cannot fit 'mop' without training activations: the batches were empty")
        levels = []
        for i, descs in enumerate(per_level):
            levels.append(VLADLevel.fit(descs, k=self.params["k"], local_dim=self.params["local"],
                                        dim=self.params["dim"], intra=self.params["intra"],
                                        seed=self.params["seed"] + i, max_descriptors=max_descriptors))
        self.levels = torch.nn.ModuleList(levels)
        self.fit_info = {"images": n_images, "channels": channels,
                         "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.path = None
        return self

    def forward(self, x: torch.Tensor, tokens: dict | None = None) -> torch.Tensor:
        _check_map(x, "mop")
        if not self.fitted:
            raise UsageError(
                "pooling 'mop' must be fitted first: call pooling.fit(batches of training activations) "
                "or load a fitted codebook with deepfeat.pooling.load_pooling(path)"
            )
        if self.fit_info.get("channels") is not None and x.shape[1] != self.fit_info["channels"]:
            raise UsageError(f"this MOP codebook was fitted on {self.fit_info['channels']}-channel maps, "
                             f"got {x.shape[1]} channels")
        g = mac(x) if self.params["pool"] == "mac" else avg_pool(x)
        parts = [l2_normalize(g)]
        for level, desc in zip(self.levels, self.windows(x)):
            parts.append(level(desc.to(level.centers.dtype)).to(x.dtype))
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write the fitted codebook as a self-describing ``.npz`` (arrays + JSON meta)."""
        from deepfeat.postprocess.files import _version, _write_npz

        if not self.fitted:
            raise UsageError("pooling 'mop' is not fitted; nothing to save")
        arrays: dict[str, np.ndarray] = {}
        for i, lv in enumerate(self.levels):
            arrays.update(lv.arrays(f"level{i + 2}."))
        meta = {
            "kind": MOP_FILE_KIND,
            "format_version": MOP_FORMAT_VERSION,
            "spec": self.spec,
            "fit": self.fit_info,
            "levels": [{"intra": lv.intra, "alpha": lv.alpha, "info": lv.info, "dim": lv.out_dim}
                       for lv in self.levels],
            "output_dim": self.output_dim(self.fit_info["channels"]),
            "fitted_on": self.fit_info["images"],
            "deepfeat_version": _version(),
            "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "extra": extra or {},
        }
        _write_npz(path, arrays, meta)
        self.path = os.fspath(path)
