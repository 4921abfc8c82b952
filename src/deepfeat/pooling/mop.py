"""MOP-CNN building blocks (Gong et al., ECCV 2014): patch and window grids, VLAD,
k-means, one fitted VLAD level, and the MOP vector from given descriptors.

The pooling that fits and applies them to a map is :class:`~deepfeat.pooling.mop_pooling.MOPPooling`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deepfeat.errors import FormatError, UsageError
from deepfeat.pooling.common import EPS, _check_map, l2_normalize


def mop_patch_grid(image_hw: tuple[int, int], window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """MOP-CNN patch boxes ``(y0, x0, y1, x1)`` of side *window* every *stride* pixels.

    Gong et al. 2014 use a 256 x 256 image with 128-px patches (5 x 5 = 25) and
    64-px patches (7 x 7 = 49), stride 32. A window larger than a side is clamped
    to that side. Windows start at 0, stride, 2 stride, ... while they fit.
    """
    H, W = int(image_hw[0]), int(image_hw[1])
    window, stride = int(window), int(stride)
    if H < 1 or W < 1 or window < 1 or stride < 1:
        raise UsageError(f"mop_patch_grid needs positive sizes, got image {H}x{W}, window {window}, stride {stride}")
    wh, ww = min(window, H), min(window, W)
    return [(y, x, y + wh, x + ww) for y in range(0, H - wh + 1, stride) for x in range(0, W - ww + 1, stride)]


def mop_windows(x: torch.Tensor, window: float, step: float, cell: float | tuple[float, float],
                pool: str = "mac") -> torch.Tensor:
    """Descriptors of the feature-map windows MOP uses in place of image patches.

    A window of *window* input pixels every *step* pixels becomes
    ``round(window / cell)`` cells every ``max(1, round(step / cell))`` cells, where
    *cell* is the layer's stride in pixels (input size / map size; a pair for
    (height, width)). Windows are clamped to the map; each is max- or average-
    pooled. Returns ``N x M x C`` (windows in row-major order).
    """
    _check_map(x, "mop")
    H, W = int(x.shape[2]), int(x.shape[3])
    ch, cw = (cell, cell) if not isinstance(cell, (tuple, list)) else cell
    kh = min(H, max(1, round(window / ch)))
    kw = min(W, max(1, round(window / cw)))
    sh = max(1, round(step / ch))
    sw = max(1, round(step / cw))
    if pool == "mac":
        y = F.max_pool2d(x, (kh, kw), stride=(sh, sw))
    elif pool == "avg":
        y = F.avg_pool2d(x, (kh, kw), stride=(sh, sw))
    else:
        raise UsageError(f"MOP window pooling must be mac or avg, got {pool!r}")
    return y.flatten(2).transpose(1, 2)


def vlad(desc: torch.Tensor, centers: torch.Tensor, intra: bool = False, alpha: float = 0.5,
         eps: float = EPS) -> torch.Tensor:
    """VLAD of local descriptors ``N x M x D`` with a ``K x D`` codebook -> ``N x K*D``.

    Hard-assigns each descriptor to its nearest centre and sums residuals per
    centre (Jégou, Douze, Schmid & Pérez, CVPR 2010); then optional
    intra-normalisation (L2 per centre block; Arandjelović & Zisserman, "All about
    VLAD", CVPR 2013), signed power law ``alpha`` and a global L2 (Jégou et al.,
    TPAMI 2012), as MOP-CNN uses it.
    """
    K = centers.shape[0]
    d2 = (desc * desc).sum(-1, keepdim=True) - 2.0 * desc @ centers.t() + (centers * centers).sum(-1)
    idx = d2.argmin(dim=-1)  # N x M
    assign = (idx.unsqueeze(-1) == torch.arange(K, device=desc.device)).to(desc.dtype)  # N x M x K
    v = assign.transpose(1, 2) @ desc - assign.sum(dim=1).unsqueeze(-1) * centers  # N x K x D
    if intra:
        v = l2_normalize(v, eps)
    v = v.flatten(1)
    if alpha != 1:
        v = torch.sign(v) * v.abs().pow(alpha)
    return l2_normalize(v, eps)


def kmeans(X: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, deterministic for a given *seed*; ``k x D`` float32.

    Empty clusters are re-seeded with the point farthest from its centre.
    """
    X = np.ascontiguousarray(X, dtype=np.float64)
    n = X.shape[0]
    if n < k:
        raise UsageError(f"k-means with k={k} needs at least {k} local descriptors, got {n}; "
                         "fit on more images or lower k")
    rng = np.random.default_rng(seed)
    sq = (X * X).sum(1)
    centers = np.empty((k, X.shape[1]))
    centers[0] = X[rng.integers(n)]
    d2 = np.maximum(sq - 2 * X @ centers[0] + centers[0] @ centers[0], 0)
    for i in range(1, k):
        total = d2.sum()
        if not total > 0:
            raise UsageError(f"k-means with k={k} needs at least {k} distinct local descriptors, "
                             f"found only {i}; fit on more images or lower k")
        centers[i] = X[rng.choice(n, p=d2 / total)]
        d2 = np.minimum(d2, np.maximum(sq - 2 * X @ centers[i] + centers[i] @ centers[i], 0))
    labels = None
    for _ in range(iters):
        dist = sq[:, None] - 2 * X @ centers.T + (centers * centers).sum(1)[None]
        new = dist.argmin(1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, X)
        for j in np.flatnonzero(counts == 0):
            far = int(dist[np.arange(n), labels].argmax())
            sums[j], counts[j] = X[far], 1
            labels[far] = j
            dist[far, :] = 0
        centers = sums / counts[:, None]
    return centers.astype(np.float32)


class VLADLevel(torch.nn.Module):
    """One MOP level: (optional) PCA of local descriptors, a k-means codebook,
    VLAD, (optional) PCA of the VLAD, L2. Tensors are buffers, so the level moves
    with ``.to(device)`` and exports to ONNX."""

    def __init__(self, centers: torch.Tensor, local_mean: torch.Tensor | None = None,
                 local_proj: torch.Tensor | None = None, vlad_mean: torch.Tensor | None = None,
                 vlad_proj: torch.Tensor | None = None, intra: bool = False, alpha: float = 0.5,
                 info: dict[str, Any] | None = None):
        super().__init__()
        self.register_buffer("centers", torch.as_tensor(centers, dtype=torch.float32))
        self.register_buffer("local_mean", None if local_mean is None else torch.as_tensor(local_mean, dtype=torch.float32))
        self.register_buffer("local_proj", None if local_proj is None else torch.as_tensor(local_proj, dtype=torch.float32))
        self.register_buffer("vlad_mean", None if vlad_mean is None else torch.as_tensor(vlad_mean, dtype=torch.float32))
        self.register_buffer("vlad_proj", None if vlad_proj is None else torch.as_tensor(vlad_proj, dtype=torch.float32))
        self.intra = bool(intra)
        self.alpha = float(alpha)
        self.info = dict(info or {})

    @property
    def input_dim(self) -> int:
        return int(self.local_proj.shape[1]) if self.local_proj is not None else int(self.centers.shape[1])

    @property
    def out_dim(self) -> int:
        if self.vlad_proj is not None:
            return int(self.vlad_proj.shape[0])
        return int(self.centers.shape[0] * self.centers.shape[1])

    def local(self, desc: torch.Tensor) -> torch.Tensor:
        if self.local_proj is None:
            return desc
        return (desc - self.local_mean) @ self.local_proj.t()

    def raw_vlad(self, desc: torch.Tensor) -> torch.Tensor:
        """Normalised VLAD (before the level PCA) of ``N x M x C`` local descriptors."""
        return vlad(self.local(desc), self.centers.to(desc.dtype), self.intra, self.alpha)

    def forward(self, desc: torch.Tensor) -> torch.Tensor:
        """``N x M x C`` local descriptors -> ``N x out_dim`` unit vectors."""
        if desc.dim() != 3 or desc.shape[-1] != self.input_dim:
            raise UsageError(f"this MOP level encodes N x M x {self.input_dim} local descriptors, "
                             f"got shape {tuple(desc.shape)}")
        v = self.raw_vlad(desc)
        if self.vlad_proj is not None:
            v = l2_normalize((v - self.vlad_mean) @ self.vlad_proj.t())
        return v

    @classmethod
    def fit(cls, descs: Sequence[np.ndarray | torch.Tensor], k: int = 100, local_dim: int = 128, dim: int = 256,
            intra: bool = False, alpha: float = 0.5, seed: int = 0, max_descriptors: int = 100_000,
            iters: int = 50) -> VLADLevel:
        """Fit a level on local descriptors: *descs* is a list of ``N_b x M_b x C``
        arrays (a batch of N_b images with M_b descriptors each; ``M x C`` is one image).

        Local PCA to *local_dim* (0, or >= C: none) and k-means use at most
        *max_descriptors* randomly chosen descriptors (seeded); the level PCA to
        *dim* (0: keep the K*D VLAD) is fitted on the VLADs of all images, so it
        needs more than *dim* images.
        """
        from deepfeat.postprocess import PCA

        batches = []
        for d in descs:
            a = d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d)
            if a.ndim == 2:
                a = a[None]
            if a.ndim != 3:
                raise UsageError(f"local descriptors must be N x M x C (or M x C), got shape {a.shape}")
            batches.append(np.ascontiguousarray(a, dtype=np.float32))
        if not batches:
            raise UsageError("cannot fit a MOP level without descriptors: the training batches were empty")
        C = batches[0].shape[2]
        if any(b.shape[2] != C for b in batches):
            raise UsageError("all local descriptors of a MOP level must have the same dimension")
        flat = np.concatenate([b.reshape(-1, C) for b in batches])
        n_images = sum(b.shape[0] for b in batches)
        rng = np.random.default_rng(seed)
        sample = flat if len(flat) <= max_descriptors else flat[rng.choice(len(flat), max_descriptors, replace=False)]
        local_mean = local_proj = None
        if 0 < local_dim < C:
            pca = PCA().fit(sample, local_dim)
            local_mean, local_proj = pca.mean, pca.components
            sample = pca.apply(sample)
        centers = kmeans(sample, k, seed=seed, iters=iters)
        level = cls(torch.from_numpy(centers),
                    None if local_mean is None else torch.from_numpy(local_mean),
                    None if local_proj is None else torch.from_numpy(local_proj),
                    intra=intra, alpha=alpha)
        if dim:
            with torch.no_grad():
                vlads = np.concatenate([level.raw_vlad(torch.from_numpy(b)).numpy() for b in batches])
            if dim > vlads.shape[1]:
                raise UsageError(f"MOP level PCA to {dim} dims, but the VLAD has only {vlads.shape[1]} "
                                 f"(k={k} x {centers.shape[1]}); lower dim or use dim=0")
            if n_images <= dim:
                raise UsageError(f"MOP level PCA to {dim} dims needs more than {dim} training images, "
                                 f"got {n_images}; fit on more images, lower dim=, or use dim=0 (no reduction)")
            vp = PCA().fit(vlads, dim)
            level.vlad_mean = torch.from_numpy(vp.mean).float()
            level.vlad_proj = torch.from_numpy(vp.components).float()
        level.info = {"images": int(n_images), "descriptors": len(flat), "kmeans_sample": len(sample),
                      "k": int(k), "local_dim": int(level.centers.shape[1]), "dim": level.out_dim, "seed": int(seed)}
        return level

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for name in ("centers", "local_mean", "local_proj", "vlad_mean", "vlad_proj"):
            t = getattr(self, name)
            if t is not None:
                out[prefix + name] = t.detach().cpu().numpy()
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str, meta: dict[str, Any]) -> VLADLevel:
        def get(name: str) -> torch.Tensor | None:
            a = arrays.get(prefix + name)
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

        centers = get("centers")
        if centers is None:
            raise FormatError(f"MOP codebook file lacks {prefix}centers")
        return cls(centers, get("local_mean"), get("local_proj"), get("vlad_mean"), get("vlad_proj"),
                   intra=bool(meta.get("intra", False)), alpha=float(meta.get("alpha", 0.5)), info=meta.get("info"))


def mop_encode(global_desc: torch.Tensor, level_descs: Sequence[torch.Tensor],
               levels: Sequence[VLADLevel]) -> torch.Tensor:
    """The MOP vector from a global descriptor (``N x D``, e.g. fc7 of the whole
    image) and per-level local descriptors (``N x M_i x D``, e.g. fc7 of every
    patch of :func:`mop_patch_grid`): the exact patch-based recipe of Gong et al."""
    if len(level_descs) != len(levels):
        raise UsageError(f"mop_encode got {len(level_descs)} descriptor sets for {len(levels)} levels")
    parts = [l2_normalize(global_desc)] + [lv(d) for lv, d in zip(levels, level_descs)]
    return torch.cat(parts, dim=1) / math.sqrt(len(parts))


def layer_stride(input_hw: tuple[int, int], map_hw: tuple[int, int]) -> tuple[float, float]:
    """A layer's stride in input pixels, (input H / map H, input W / map W): MOP's ``cell``."""
    return input_hw[0] / map_hw[0], input_hw[1] / map_hw[1]
