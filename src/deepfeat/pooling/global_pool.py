"""Global poolings, one pure function each: the whole map -> one value per channel
(``none``, SUM, AVE, SPoC, MAC, GeM), and :class:`GeM` with a learnable power."""

from __future__ import annotations

import math

import torch

from deepfeat.errors import UsageError
from deepfeat.pooling.common import EPS, _check_map


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
        "choose a spatial pooling"
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
