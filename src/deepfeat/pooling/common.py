"""What every pooling function shares: the epsilon, the check that the input is an
``N x C x H x W`` map, and L2 normalisation."""

from __future__ import annotations

import torch

from deepfeat.errors import UsageError

EPS = 1e-6


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
        + (" (an N x T x C token sequence or an N x H x W x C map is turned into one by its tap layout: "
           "deepfeat.models.layouts.tap_layout(net, layer).split(x, input_hw))" if x.dim() == 3 else "")
    )


def l2_normalize(x: torch.Tensor, eps: float = EPS, dim: int = -1) -> torch.Tensor:
    """``x / max(||x||, eps)`` along *dim* (unit norm unless the vector is ~0)."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp_min(eps)
