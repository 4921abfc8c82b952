"""CroW: cross-dimensional (spatial and channel) weighting before sum pooling."""

from __future__ import annotations

import torch

from deepfeat.pooling.common import _check_map


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
