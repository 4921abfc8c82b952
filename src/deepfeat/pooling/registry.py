"""Pooling: turn an ``N x C x H x W`` activation into ``N x D`` descriptors.

Each method of the literature is a pure tensor function (``sum_pool``,
``avg_pool``, ``spoc``, ``mac``, ``gem``, ``rmac``, ``rgem``, ``crow``, ``mop``),
plus a name registry so any layer can be pooled any way from one string::

    get_pooling("gem:p=3")          # or gem:3
    get_pooling("rmac:L=3")
    get_pooling("rmac+mac")         # concatenation of L2-normalised parts
    get_pooling("crow:a=2,b=2")
    get_pooling("none")             # an already pooled N x D layer passes through

Spec grammar: ``part ("+" part)*`` with ``part = name[:arg[,arg...]]`` and
``arg = key=value`` or a bare value for the method's parameters in order
(``gem:3`` is ``gem:p=3``). :data:`POOLINGS` lists the methods with their
parameters, one-line summary and citation.

The functions use torch operations only (loops run over regions derived from the
shape, never over data values), so a :class:`Pooling` can sit inside a graph
exported by ``torch.onnx.export(..., dynamo=False)`` at a fixed input shape, on
any device, in any float dtype.

Spatial poolings need ``N x C x H x W`` maps of any size (1 x 1 included) and
reject ``N x D`` input with a :class:`~deepfeat.errors.UsageError` pointing to
``none``; treating a vector as a 1 x 1 map would silently change it (GeM clamps
negatives, CroW re-weights), so deepfeat refuses instead.

Multi-scale: :func:`combine_scales` sums or generalised-means per-scale vectors;
:meth:`Pooling.multiscale` applies the method's own rule (regional poolings sum
their regional vectors over all scales before the final L2, as Tolias et al. and
Gordo et al. do); :func:`pool_multiscale` runs a feature extractor on rescaled
copies of a batch and does both.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FormatError, UsageError, suggest

EPS = 1e-6
DEFAULT_SCALES = (1.0, 2**-0.5, 0.5)
COMBINE_MODES = ("sum", "gem")
MOP_FILE_KIND = "deepfeat.mop-codebook"
MOP_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _check_map(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"pooling {name!r} needs a torch tensor, got {type(x).__name__}")
    if x.dim() == 4:
        return
    if x.dim() == 2:
        raise UsageError(
            f"pooling {name!r} needs an N x C x H x W activation map, got an N x D tensor of shape "
            f"{tuple(x.shape)}: that layer is already pooled, use pooling 'none'"
        )
    raise UsageError(
        f"pooling {name!r} needs an N x C x H x W activation map, got shape {tuple(x.shape)}"
        + (" (add the batch dimension: x[None])" if x.dim() == 3 else "")
    )


def l2_normalize(x: torch.Tensor, eps: float = EPS, dim: int = -1) -> torch.Tensor:
    """``x / max(||x||, eps)`` along *dim* (unit norm unless the vector is ~0)."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp_min(eps)


# ---------------------------------------------------------------------------
# Global poolings
# ---------------------------------------------------------------------------


def no_pool(x: torch.Tensor) -> torch.Tensor:
    """``none``: an ``N x D`` (already pooled, e.g. an FC layer) passes through;
    an ``N x C x 1 x 1`` map is flattened; larger maps are refused."""
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        return x
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[2] == 1 and x.shape[3] == 1:
        return x.flatten(1)
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
    raise UsageError(
        f"pooling 'none' needs an already pooled N x D layer (or N x C x 1 x 1), got {shape}; "
        f"choose a spatial pooling: {', '.join(n for n in POOLINGS if n != 'none')}"
    )


def sum_pool(x: torch.Tensor) -> torch.Tensor:
    """SUM pooling: the sum of every channel over all positions (SPoC without the
    centre prior; Babenko & Lempitsky, "Aggregating Deep Convolutional Features
    for Image Retrieval", ICCV 2015)."""
    _check_map(x, "sum")
    return x.sum(dim=(2, 3))


def avg_pool(x: torch.Tensor) -> torch.Tensor:
    """AVE pooling: the mean of every channel over all positions (Babenko &
    Lempitsky 2015; equal to ``sum`` up to the factor H*W)."""
    _check_map(x, "avg")
    return x.mean(dim=(2, 3))


def spoc_center_prior(H: int, W: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """SPoC's Gaussian centre prior ``alpha(y, x)`` on an H x W grid.

    ``alpha = exp(-((y - H/2)^2 + (x - W/2)^2) / (2 sigma^2))`` with sigma one third
    of the distance from the centre to the closest border, i.e. ``min(H, W) / 6``
    (Babenko & Lempitsky 2015, Sec. 4). Positions are cell centres ``i + 0.5``,
    so the prior is symmetric on both even and odd grids.
    """
    H, W = int(H), int(W)
    sigma = min(H, W) / 6.0
    rows = []
    for i in range(H):
        dy = i + 0.5 - H / 2.0
        rows.append([math.exp(-(dy * dy + (j + 0.5 - W / 2.0) ** 2) / (2.0 * sigma * sigma)) for j in range(W)])
    return torch.tensor(rows, dtype=dtype, device=device)


def spoc(x: torch.Tensor, center_prior: bool = False) -> torch.Tensor:
    """SPoC: sum pooling, optionally weighted by a Gaussian centre prior
    (Babenko & Lempitsky, "Aggregating Deep Convolutional Features for Image
    Retrieval", ICCV 2015). The paper follows it with L2, PCA-whitening and L2:
    use the post-processing chain ``l2,pca-whiten:256,l2``."""
    _check_map(x, "spoc")
    if not center_prior:
        return x.sum(dim=(2, 3))
    w = spoc_center_prior(x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)
    return (x * w).sum(dim=(2, 3))


def mac(x: torch.Tensor) -> torch.Tensor:
    """MAC: the maximum of every channel over all positions (Tolias, Sicre &
    Jégou, "Particular object retrieval with integral max-pooling of CNN
    activations", ICLR 2016; Razavian et al. 2016)."""
    _check_map(x, "mac")
    return x.amax(dim=(2, 3))


def gem(x: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = EPS) -> torch.Tensor:
    """GeM: generalised mean ``(mean(x^p))^(1/p)`` per channel, activations
    clamped at *eps* (Radenović, Tolias & Chum, "Fine-tuning CNN Image Retrieval
    with No Human Annotation", TPAMI 2018).

    p = 1 is average pooling and p -> inf tends to MAC. *p* may be a float or a
    tensor (learnable, see :class:`GeM`). Computed as ``m * mean((x/m)^p)^(1/p)``
    with ``m`` the channel maximum, which is the same value without overflow for
    large p.
    """
    _check_map(x, "gem")
    x = x.clamp(min=eps)
    m = x.amax(dim=(2, 3), keepdim=True)
    return m.flatten(1) * (x / m).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class GeM(torch.nn.Module):
    """GeM pooling with a (by default learnable) power *p*, cirtorch style:
    a thin module around :func:`gem` returning ``N x C``."""

    def __init__(self, p: float = 3.0, eps: float = EPS, learnable: bool = True):
        super().__init__()
        if not p > 0:
            raise UsageError(f"GeM power p must be > 0, got {p}")
        if learnable:
            self.p = torch.nn.Parameter(torch.full((1,), float(p)))
        else:
            self.register_buffer("p", torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, p=self.p, eps=self.eps)

    def to_pooling(self) -> Pooling:
        """The registry :class:`Pooling` with the current (e.g. learned) p."""
        return get_pooling(f"gem:p={float(self.p.detach().reshape(-1)[0]):.6g}")

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach().reshape(-1)[0]):.4f}, eps={self.eps}"


# ---------------------------------------------------------------------------
# Regional poolings (R-MAC grid)
# ---------------------------------------------------------------------------


def rmac_regions(H: int, W: int, L: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """The R-MAC regions of an H x W map as ``(y0, x0, y1, x1)`` boxes (0-based, end exclusive).

    Tolias, Sicre & Jégou, ICLR 2016, Sec. 3 and their ``rmac_regions``: at level
    ``l = 1..L`` square regions of side ``floor(2 min(H, W) / (l + 1))``; ``l``
    regions along the short side and ``l + m`` along the long one, ``m`` (0..6)
    chosen so consecutive level-1 regions overlap as close to *overlap* as
    possible; positions spread uniformly. Order: by level, then row, then column.
    """
    H, W, L = int(H), int(W), int(L)
    if H < 1 or W < 1:
        raise UsageError(f"R-MAC needs a map of at least 1 x 1, got {H} x {W}")
    if L < 1:
        raise UsageError(f"R-MAC needs L >= 1 levels, got {L}")
    if not 0.0 < overlap < 1.0:
        raise UsageError(f"R-MAC overlap must be in (0, 1), got {overlap}")
    w = min(H, W)
    extra_w = extra_h = 0
    if H != W:
        costs = []
        for steps in (2, 3, 4, 5, 6, 7):
            b = (max(H, W) - w) / (steps - 1)
            costs.append(abs((w * w - w * b) / (w * w) - overlap))
        idx = costs.index(min(costs)) + 1  # first minimum, 1-based as in the reference
        if H < W:
            extra_w = idx
        else:
            extra_h = idx
    regions = []
    for level in range(1, L + 1):
        wl = math.floor(2 * w / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        nw, nh = level + extra_w, level + extra_h
        bw = (W - wl) / (nw - 1) if nw > 1 else 0.0
        bh = (H - wl) / (nh - 1) if nh > 1 else 0.0
        xs = [math.floor(wl2 + i * bw) - wl2 for i in range(nw)]
        ys = [math.floor(wl2 + i * bh) - wl2 for i in range(nh)]
        for y0 in ys:
            for x0 in xs:
                regions.append((y0, x0, y0 + wl, x0 + wl))
    return regions


def regional_sum(x: torch.Tensor, region_pool: Callable[[torch.Tensor], torch.Tensor], L: int = 3,
                 overlap: float = 0.4, eps: float = EPS) -> torch.Tensor:
    """Sum of the L2-normalised ``region_pool`` vectors over the R-MAC regions (not normalised)."""
    H, W = int(x.shape[2]), int(x.shape[3])
    total = None
    for y0, x0, y1, x1 in rmac_regions(H, W, L, overlap):
        v = l2_normalize(region_pool(x[:, :, y0:y1, x0:x1]), eps)
        total = v if total is None else total + v
    return total  # type: ignore[return-value]


def rmac(x: torch.Tensor, L: int = 3, overlap: float = 0.4, eps: float = EPS) -> torch.Tensor:
    """R-MAC: MAC of each region of the multi-scale grid (:func:`rmac_regions`),
    each L2-normalised, summed, L2-normalised (Tolias, Sicre & Jégou, "Particular
    object retrieval with integral max-pooling of CNN activations", ICLR 2016).
    The paper's optional PCA-whitening of every regional vector is not applied."""
    _check_map(x, "rmac")
    return l2_normalize(regional_sum(x, mac, L, overlap, eps), eps)


def rgem(x: torch.Tensor, p: float = 3.0, L: int = 3, overlap: float = 0.4, eps: float = EPS) -> torch.Tensor:
    """Regional GeM: R-MAC with GeM instead of MAC in every region (Radenović,
    Tolias & Chum, TPAMI 2018; the region grid of Tolias et al. 2016)."""
    _check_map(x, "rgem")
    return l2_normalize(regional_sum(x, lambda r: gem(r, p, eps), L, overlap, eps), eps)


# ---------------------------------------------------------------------------
# CroW
# ---------------------------------------------------------------------------


def crow(x: torch.Tensor, a: float = 2.0, b: float = 2.0) -> torch.Tensor:
    """CroW: cross-dimensional weighting and sum pooling (Kalantidis, Mellina &
    Osindero, "Cross-dimensional Weighting for Aggregated Deep Convolutional
    Features", ECCV Workshops 2016).

    Spatial weight ``S' = (S / ||S||_a)^(1/b)`` from the channel sum S of every
    position; channel weight ``log(sum_j Q_j / Q_k)`` (0 where Q_k = 0) from the
    fraction Q_k of non-zero positions of channel k; the descriptor is
    ``beta_k * sum_{y,x} S'(y, x) x_k(y, x)``, as in the authors' code. Meant for
    non-negative (post-ReLU) maps; negative channel sums are clamped at 0 in S.
    """
    _check_map(x, "crow")
    H, W = int(x.shape[2]), int(x.shape[3])
    tiny = torch.finfo(x.dtype).tiny
    S = x.sum(dim=1).clamp(min=0.0)  # N x H x W
    z = S.pow(a).sum(dim=(1, 2), keepdim=True).pow(1.0 / a).clamp_min(tiny)
    S = S / z
    if b != 1:
        S = S.pow(1.0 / b)
    Q = (x != 0).to(x.dtype).sum(dim=(2, 3)) / float(H * W)  # N x C
    total = Q.sum(dim=1, keepdim=True)
    beta = torch.where(Q > 0, torch.log(total / Q.clamp_min(tiny)), torch.zeros_like(Q))
    return (x * S[:, None]).sum(dim=(2, 3)) * beta


# ---------------------------------------------------------------------------
# Multi-scale
# ---------------------------------------------------------------------------


def combine_scales(vectors: Sequence[torch.Tensor], mode: str = "sum", p: float = 3.0,
                   eps: float = EPS) -> torch.Tensor:
    """Combine ``N x D`` vectors pooled at several scales into one ``N x D``.

    ``sum``: their sum. ``gem``: the generalised mean ``(mean_s v_s^p)^(1/p)`` with
    values clamped at *eps* (cirtorch's multi-scale ``msp``; p=1 is the mean).
    Nothing is normalised here; see :meth:`Pooling.multiscale` for the per-method rule.
    """
    if not vectors:
        raise UsageError("combine_scales needs at least one vector")
    if mode not in COMBINE_MODES:
        raise UsageError(f"scale combination {mode!r} unknown; choose from {', '.join(COMBINE_MODES)}")
    shape = tuple(vectors[0].shape)
    for v in vectors:
        if tuple(v.shape) != shape:
            raise UsageError(f"cannot combine scales with different shapes: {shape} and {tuple(v.shape)}")
    if mode == "sum":
        out = vectors[0]
        for v in vectors[1:]:
            out = out + v
        return out
    if not p > 0:
        raise UsageError(f"generalised-mean power p must be > 0, got {p}")
    acc = vectors[0].clamp(min=eps).pow(p)
    for v in vectors[1:]:
        acc = acc + v.clamp(min=eps).pow(p)
    return (acc / len(vectors)).pow(1.0 / p)


def parse_scales(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"1,0.707,0.5"`` (fractions like ``1/2`` allowed) -> ``(1.0, 0.707, 0.5)``."""
    if not isinstance(text, str):
        vals = tuple(float(s) for s in text)
    else:
        vals_list = []
        for part in text.split(","):
            part = part.strip()
            try:
                if "/" in part:
                    num, den = part.split("/")
                    vals_list.append(float(num) / float(den))
                else:
                    vals_list.append(float(part))
            except (ValueError, ZeroDivisionError):
                raise UsageError(f"scales {text!r}: {part!r} is not a number (use e.g. 1,0.707,0.5)") from None
        vals = tuple(vals_list)
    if not vals or any(not s > 0 for s in vals):
        raise UsageError(f"scales must be positive numbers, got {text!r}")
    return vals


def rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Resize a normalised ``N x C x H x W`` batch by *scale* (bilinear, as cirtorch)."""
    if scale == 1:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def pool_multiscale(features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, pooling: Pooling | str,
                    scales: Sequence[float] = DEFAULT_SCALES, mode: str = "sum", p: float = 3.0) -> torch.Tensor:
    """Run *features* (normalised batch -> activation map) on *x* rescaled by every
    scale and combine with ``pooling.multiscale``; the result is L2-normalised."""
    pooling = get_pooling(pooling)
    maps = [features(rescale(x, float(s))) for s in scales]
    return pooling.multiscale(maps, mode=mode, p=p)


# ---------------------------------------------------------------------------
# MOP: multi-scale orderless pooling (VLAD of windows)
# ---------------------------------------------------------------------------


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
        from ..postprocess import PCA

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


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of a pooling spec."""

    name: str
    kind: str  # "float", "int", "bool", "ints" (slash-separated), or "choice"
    default: Any
    rule: str  # what valid values are, for error messages
    check: Callable[[Any], bool] = lambda v: True
    shown: bool = True  # always in the canonical spec (else only when not the default)
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class PoolingKind:
    """A registered pooling method: its name, parameters, one-line summary and citation."""

    name: str
    summary: str
    citation: str
    params: tuple[Param, ...] = ()
    fn: Callable[..., torch.Tensor] | None = None
    region_pool: Callable[..., Callable[[torch.Tensor], torch.Tensor]] | None = None  # regional kinds
    needs_fit: bool = False
    aliases: tuple[str, ...] = field(default=())

    @property
    def syntax(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{p.name}={_fmt_value(p, p.default) if p.default is not None else '...'}"
                                          for p in self.params if p.shown)


def _pos(v: Any) -> bool:
    return v > 0


_P_GEM = Param("p", "float", 3.0, "a number > 0", _pos)
_P_EPS = Param("eps", "float", EPS, "a number > 0", _pos, shown=False)
_P_L = Param("L", "int", 3, "an integer >= 1", lambda v: v >= 1)
_P_OVR = Param("overlap", "float", 0.4, "a number in (0, 1)", lambda v: 0 < v < 1, shown=False)

POOLINGS: dict[str, PoolingKind] = {
    k.name: k
    for k in (
        PoolingKind("none", "no pooling: an already pooled N x D layer (FC, global pool) passes through",
                    "Razavian et al., CNN features off-the-shelf, CVPRW 2014", fn=lambda x: no_pool(x)),
        PoolingKind("sum", "sum over positions (SUM pooling)",
                    "Babenko & Lempitsky, Aggregating deep convolutional features for image retrieval, ICCV 2015",
                    fn=lambda x: sum_pool(x)),
        PoolingKind("avg", "mean over positions (AVE pooling)",
                    "Babenko & Lempitsky, ICCV 2015", fn=lambda x: avg_pool(x), aliases=("ave", "mean")),
        PoolingKind("spoc", "sum pooling with an optional Gaussian centre prior (SPoC)",
                    "Babenko & Lempitsky, ICCV 2015",
                    (Param("center_prior", "bool", False, "0 or 1", shown=False),),
                    fn=lambda x, center_prior: spoc(x, center_prior)),
        PoolingKind("mac", "max over positions (MAC)",
                    "Tolias, Sicre & Jégou, Particular object retrieval with integral max-pooling of CNN "
                    "activations, ICLR 2016", fn=lambda x: mac(x), aliases=("max",)),
        PoolingKind("gem", "generalised mean (mean x^p)^(1/p); p=1 avg, p->inf MAC (GeM)",
                    "Radenović, Tolias & Chum, Fine-tuning CNN image retrieval with no human annotation, TPAMI 2018",
                    (_P_GEM, _P_EPS), fn=lambda x, p, eps: gem(x, p, eps)),
        PoolingKind("rmac", "MAC of multi-scale square regions, each L2-normalised, summed, L2 (R-MAC)",
                    "Tolias, Sicre & Jégou, ICLR 2016", (_P_L, _P_OVR, _P_EPS),
                    region_pool=lambda **kw: mac, aliases=("r-mac",)),
        PoolingKind("rgem", "R-MAC regions pooled with GeM instead of MAC (regional GeM)",
                    "Radenović, Tolias & Chum, TPAMI 2018 (regions: Tolias et al. 2016)",
                    (_P_GEM, _P_L, _P_OVR, _P_EPS),
                    region_pool=lambda p, eps, **kw: (lambda r: gem(r, p, eps)), aliases=("r-gem",)),
        PoolingKind("crow", "sum pooling with spatial (a, b) and IDF-like channel weights (CroW)",
                    "Kalantidis, Mellina & Osindero, Cross-dimensional weighting for aggregated deep "
                    "convolutional features, ECCVW 2016",
                    (Param("a", "float", 2.0, "a number > 0", _pos), Param("b", "float", 2.0, "a number > 0", _pos)),
                    fn=lambda x, a, b: crow(x, a, b)),
        PoolingKind("mop", "global + VLAD of windows at two scales, PCA per level, concatenated (MOP); needs fit",
                    "Gong, Wang, Guo & Lazebnik, Multi-scale orderless pooling of deep convolutional activation "
                    "features, ECCV 2014",
                    (Param("k", "int", 100, "an integer >= 2", lambda v: v >= 2),
                     Param("local", "int", 128, "an integer >= 0 (0: no local PCA)", lambda v: v >= 0),
                     Param("dim", "int", 256, "an integer >= 0 (0: no level PCA)", lambda v: v >= 0),
                     Param("windows", "ints", (128, 64), "window sizes in input pixels, e.g. 128/64",
                           lambda v: len(v) >= 1 and all(w > 0 for w in v)),
                     Param("step", "float", 32.0, "a number of pixels > 0", _pos),
                     Param("cell", "float", 32.0, "the layer stride in pixels, > 0", _pos),
                     Param("input", "int", 0, "the input side in pixels (0: use cell)", lambda v: v >= 0, shown=False),
                     Param("pool", "choice", "mac", "mac or avg", choices=("mac", "avg")),
                     Param("intra", "bool", False, "0 or 1", shown=False),
                     Param("seed", "int", 0, "an integer", shown=False)),
                    needs_fit=True),
    )
}

_ALIASES = {a: k.name for k in POOLINGS.values() for a in k.aliases}


def list_poolings() -> list[str]:
    """The registered pooling names, in display order."""
    return list(POOLINGS)


def _fmt_value(p: Param, v: Any) -> str:
    if p.kind == "bool":
        return "1" if v else "0"
    if p.kind == "ints":
        return "/".join(str(int(w)) for w in v)
    if p.kind == "float":
        v = float(v)
        return repr(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)
    return str(v)


def _parse_value(kind: PoolingKind, p: Param, text: str) -> Any:
    bad = UsageError(f"pooling {kind.name!r}: {p.name} must be {p.rule}, got {text!r}")
    t = text.strip()
    try:
        if p.kind == "float":
            v: Any = float(t)
            if not math.isfinite(v):
                raise bad
        elif p.kind == "int":
            fv = float(t)
            if not fv.is_integer():
                raise bad
            v = int(fv)
        elif p.kind == "bool":
            low = t.lower()
            if low in ("1", "true", "yes", "on"):
                v = True
            elif low in ("0", "false", "no", "off"):
                v = False
            else:
                raise bad
        elif p.kind == "ints":
            v = tuple(int(s) for s in t.split("/"))
        else:
            if t.lower() not in p.choices:
                raise bad
            v = t.lower()
    except ValueError:
        raise bad from None
    if not p.check(v):
        raise bad
    return v


_SPLIT_PARTS = re.compile(r"\+(?=\s*[A-Za-z])")


def _parse_part(text: str) -> tuple[PoolingKind, dict[str, Any], set[str]]:
    raw = text.strip()
    name, sep, argstr = raw.partition(":")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in POOLINGS:
        raise UsageError(
            f"unknown pooling {name.strip()!r}; valid poolings: {', '.join(POOLINGS)}.{suggest(key, POOLINGS)}"
        )
    kind = POOLINGS[key]
    params = {p.name: p.default for p in kind.params}
    given: set[str] = set()
    if sep and argstr.strip():
        if not kind.params:
            raise UsageError(f"pooling {kind.name!r} takes no parameters, got {raw!r}")
        by_name = {p.name.lower(): p for p in kind.params}
        order = [p for p in kind.params if p.shown]
        positional_ok = True
        for i, arg in enumerate(a.strip() for a in argstr.split(",")):
            if not arg:
                raise UsageError(f"pooling spec {raw!r} has an empty parameter")
            if "=" in arg:
                k, _, v = arg.partition("=")
                p = by_name.get(k.strip().lower())
                if p is None:
                    raise UsageError(
                        f"pooling {kind.name!r} has no parameter {k.strip()!r}; its parameters are: "
                        f"{', '.join(q.name for q in kind.params)}"
                    )
                positional_ok = False
            else:
                if not positional_ok or i >= len(order):
                    raise UsageError(
                        f"pooling spec {raw!r}: write parameters as name=value "
                        f"({', '.join(q.name for q in kind.params)}), e.g. {kind.syntax}"
                    )
                p, v = order[i], arg
            if p.name in given:
                raise UsageError(f"pooling spec {raw!r} sets {p.name} twice")
            params[p.name] = _parse_value(kind, p, v)
            given.add(p.name)
    if kind.name == "mop" and "input" in given and params["input"]:
        if "cell" in given:
            raise UsageError("pooling 'mop': give the layer stride as cell= or the input size as input=, not both")
        params["cell"] = None
    return kind, params, given


def _canonical(kind: PoolingKind, params: dict[str, Any]) -> str:
    args = []
    for p in kind.params:
        v = params.get(p.name)
        if v is None:
            continue
        if p.shown or v != p.default:
            args.append(f"{p.name}={_fmt_value(p, v)}")
    return kind.name + (":" + ",".join(args) if args else "")


def get_pooling(spec: str | Pooling) -> Pooling:
    """Parse a pooling spec (see the module docstring) into a :class:`Pooling`.

    Raises :class:`UsageError` naming the valid poolings or parameters on a bad spec.
    A :class:`Pooling` passed in is returned unchanged.
    """
    if isinstance(spec, Pooling):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty pooling spec; valid poolings: {', '.join(POOLINGS)}")
    parts = [p for p in _SPLIT_PARTS.split(spec.strip())]
    if len(parts) == 1:
        kind, params, _ = _parse_part(parts[0])
        return MOPPooling(kind, params) if kind.needs_fit else Pooling(kind, params)
    members = []
    for part in parts:
        kind, params, _ = _parse_part(part)
        if kind.name in ("none", "mop"):
            raise UsageError(f"pooling {kind.name!r} cannot be part of a '+' concatenation ({spec!r})")
        members.append(Pooling(kind, params))
    return ConcatPooling(members)


class Pooling(torch.nn.Module):
    """A parsed pooling: callable on ``N x C x H x W`` (and ``N x D`` for ``none``).

    ``name`` is the method, ``spec`` the canonical string (``gem:p=3``) that
    :func:`get_pooling` parses back to an equal pooling, ``to_dict()`` a JSON-able
    description, ``needs_fit`` True only for ``mop``, ``output_dim(C)`` the length
    of the descriptor for C channels. Being an ``nn.Module`` it can be placed in a
    network (and an ONNX export) as is.
    """

    def __init__(self, kind: PoolingKind, params: dict[str, Any]):
        super().__init__()
        self.kind = kind
        self.params = dict(params)

    # -- description -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def spec(self) -> str:
        return _canonical(self.kind, self.params)

    @property
    def needs_fit(self) -> bool:
        return self.kind.needs_fit

    @property
    def fitted(self) -> bool:
        return True

    @property
    def regional(self) -> bool:
        return self.kind.region_pool is not None

    @property
    def l2_normalized(self) -> bool:
        """True when the output rows always have unit L2 norm."""
        return self.regional

    def output_dim(self, channels: int) -> int:
        return int(channels)

    def to_dict(self) -> dict[str, Any]:
        params = {}
        for p in self.kind.params:
            v = self.params.get(p.name)
            params[p.name] = list(v) if isinstance(v, tuple) else v
        return {"name": self.name, "spec": self.spec, "params": params, "needs_fit": self.needs_fit,
                "fitted": self.fitted, "l2_normalized": self.l2_normalized, "citation": self.kind.citation}

    def extra_repr(self) -> str:
        return repr(self.spec)

    def fit(self, batches: Iterable[torch.Tensor]) -> Pooling:
        """Nothing to learn for this method; returns ``self`` (see :class:`MOPPooling`)."""
        return self

    # -- pooling -------------------------------------------------------------------

    def _fn_params(self) -> dict[str, Any]:
        return {p.name: self.params[p.name] for p in self.kind.params}

    def _regional_sum(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.name)
        kw = self._fn_params()
        region_pool = self.kind.region_pool(**kw)  # type: ignore[misc]
        return regional_sum(x, region_pool, kw["L"], kw["overlap"], kw["eps"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.regional:
            return l2_normalize(self._regional_sum(x), self.params["eps"])
        return self.kind.fn(x, **self._fn_params())  # type: ignore[misc]

    def multiscale(self, maps: Sequence[torch.Tensor], mode: str = "sum", p: float = 3.0) -> torch.Tensor:
        """One L2-normalised descriptor from the maps of several input scales.

        Global poolings: each scale's vector is L2-normalised, then combined
        (:func:`combine_scales`), then L2-normalised (cirtorch's multi-scale).
        Regional poolings (rmac, rgem): the *unnormalised* sums of regional
        vectors of every scale are combined, then L2-normalised, i.e. all regions
        of all scales are summed before the one final L2 (Tolias et al. 2016;
        Gordo et al. 2017).
        """
        if not maps:
            raise UsageError("multiscale pooling needs at least one map")
        if self.regional:
            vs = [self._regional_sum(m) for m in maps]
        else:
            vs = [l2_normalize(self(m)) for m in maps]
        return l2_normalize(combine_scales(vs, mode, p))


class ConcatPooling(Pooling):
    """``a+b+...``: the L2-normalised outputs of the parts, concatenated and scaled
    by ``1/sqrt(parts)`` so the result has unit norm and every part equal weight
    (``rmac+mac``: the summed regional vector next to the global MAC)."""

    def __init__(self, members: Sequence[Pooling]):
        super().__init__(PoolingKind("+".join(m.name for m in members), "concatenation", "", ()), {})
        self.members = torch.nn.ModuleList(members)

    @property
    def spec(self) -> str:
        return "+".join(m.spec for m in self.members)

    @property
    def regional(self) -> bool:
        return False

    @property
    def l2_normalized(self) -> bool:
        return True

    def output_dim(self, channels: int) -> int:
        return sum(m.output_dim(channels) for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "parts": [m.to_dict() for m in self.members],
                "needs_fit": False, "fitted": True, "l2_normalized": True,
                "citation": "; ".join(dict.fromkeys(m.kind.citation for m in self.members))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [l2_normalize(m(x)) for m in self.members]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))

    def multiscale(self, maps: Sequence[torch.Tensor], mode: str = "sum", p: float = 3.0) -> torch.Tensor:
        parts = [m.multiscale(maps, mode, p) for m in self.members]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        from ..postprocess import _version, _write_npz

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


def load_pooling(path: str | os.PathLike) -> MOPPooling:
    """Load a fitted MOP pooling saved with :meth:`MOPPooling.save`."""
    from ..postprocess import _read_npz

    arrays, meta = _read_npz(path, MOP_FILE_KIND)
    if int(meta.get("format_version", 0)) > MOP_FORMAT_VERSION:
        raise FormatError(f"{path}: MOP codebook format {meta.get('format_version')} is newer than this deepfeat")
    try:
        pooling = get_pooling(meta["spec"])
        level_meta = meta["levels"]
        pooling.fit_info = dict(meta["fit"])
    except KeyError as e:
        raise FormatError(f"{path}: MOP codebook meta lacks {e.args[0]!r}") from None
    if not isinstance(pooling, MOPPooling) or len(level_meta) != len(pooling.params["windows"]):
        raise FormatError(f"{path}: MOP codebook meta does not match its spec {meta.get('spec')!r}")
    pooling.levels = torch.nn.ModuleList(
        VLADLevel.from_arrays(arrays, f"level{i + 2}.", m) for i, m in enumerate(level_meta)
    )
    pooling.path = os.fspath(path)
    return pooling


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


def describe_poolings() -> list[dict[str, str]]:
    """Rows for a table of the registered poolings (name, syntax, summary, citation)."""
    return [{"name": k.name, "syntax": k.syntax, "summary": k.summary, "citation": k.citation}
            for k in POOLINGS.values()]


__all__ = [
    "COMBINE_MODES", "DEFAULT_SCALES", "POOLINGS", "ConcatPooling", "GeM", "MOPPooling", "Param", "Pooling",
    "PoolingKind", "VLADLevel", "avg_pool", "combine_scales", "crow", "describe_poolings", "gem", "get_pooling",
    "kmeans", "l2_normalize", "layer_stride", "list_poolings", "load_pooling", "mac", "mop_encode",
    "mop_patch_grid", "mop_windows", "no_pool", "parse_scales", "pool_multiscale", "regional_sum", "rescale",
    "rgem", "rmac", "rmac_regions", "spoc", "spoc_center_prior", "sum_pool", "vlad",
]
