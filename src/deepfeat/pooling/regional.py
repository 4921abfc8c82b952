"""Regional poolings on the R-MAC grid: the regions, their vectors, their sum, R-MAC and regional GeM."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from deepfeat.errors import UsageError
from deepfeat.pooling.common import EPS, _check_map, l2_normalize
from deepfeat.pooling.global_pool import gem, mac


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


def regional_vectors(x: torch.Tensor, region_pool: Callable[[torch.Tensor], torch.Tensor], L: int = 3,
                     overlap: float = 0.4, eps: float = EPS) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """Every R-MAC region's ``region_pool`` vector, L2-normalised and kept apart (not summed):
    ``N x R x C`` and the R regions as :func:`rmac_regions` boxes. These are the regional
    descriptors of Iscen et al.'s diffusion on region manifolds (CVPR 2017)."""
    _check_map(x, "regional vectors")
    boxes = rmac_regions(int(x.shape[2]), int(x.shape[3]), L, overlap)
    vecs = [l2_normalize(region_pool(x[:, :, y0:y1, x0:x1]), eps) for y0, x0, y1, x1 in boxes]
    return torch.stack(vecs, dim=1), boxes


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
