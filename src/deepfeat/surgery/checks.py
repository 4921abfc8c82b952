"""The numerical checks every conversion passes when it is built: at the native input
size the one cell equals the original classifier, and each cell of a larger map
equals the original head on its window.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepfeat.errors import ModelError
from deepfeat.models.base import Model
from deepfeat.surgery.modules import DenseClassifier

#: Tolerance of the built-in equivalence checks (relative to the output's magnitude).
CHECK_TOLERANCE = 1e-4


def _native_input(model: Model, batch: int = 1, seed: int = 0) -> torch.Tensor:
    h, w = model.data_config.input_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, model.data_config.channels, h, w, generator=g).to(model.device)



def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().flatten(), b.detach().float().flatten()
    if a.shape != b.shape:
        return math.inf
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) / scale


def _check_native(dense: DenseClassifier, model: Model) -> None:
    x = _native_input(model, batch=1, seed=1)
    with torch.no_grad():
        ref = model.net(x).float()
        if ref.dim() > 2:
            ref = ref.flatten(1)
        if dense.softmax:
            ref = ref.softmax(dim=-1)
        got = dense(x)
    if got.shape[2:] != (1, 1):
        raise ModelError(f"{model.arch}: the dense form gives a {got.shape[2]} x {got.shape[3]} map at the native "
                         f"input size, not 1 x 1; the head was not converted correctly")
    diff = _max_rel_diff(got.flatten(1), ref)
    if diff > CHECK_TOLERANCE:
        raise ModelError(f"{model.arch}: the dense form does not reproduce the classifier at the native input size "
                         f"(max difference {diff:.3g}); its head has an operation deepfeat cannot cast as a "
                         "convolution")


def _check_sliding(head_gm, head: nn.Module, fmap_shape: tuple[int, ...], window: tuple[int, int] | None,
                   arch: str) -> None:
    """Each cell of the dense head on a (h+1) x (w+1) map must equal the original head on its window."""
    if window is None:
        return
    c = fmap_shape[1]
    kh, kw = window
    g = torch.Generator().manual_seed(2)
    dev = next((p.device for p in head.parameters()), torch.device("cpu"))
    big = torch.randn(1, c, kh + 1, kw + 1, generator=g).abs().to(dev)
    with torch.no_grad():
        dense = head(big)
        for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
            ref = head_gm(big[:, :, i:i + kh, j:j + kw].contiguous()).float().flatten(1)
            diff = _max_rel_diff(dense[:, :, i, j], ref)
            if diff > CHECK_TOLERANCE:
                raise ModelError(f"{arch}: the converted head does not slide like the original one (cell {i},{j} "
                                 f"differs by {diff:.3g}); its head has an operation with no convolutional form")

