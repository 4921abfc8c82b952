"""Taps as pictures whatever their layout, and the patch-norm map of a transformer.

:func:`layer_map` (from :mod:`.network`) reads a tap by the layout the model gives it (:mod:`deepfeat.models.layouts`): a
ViT's ``N x T x C`` tokens become the ``C x gh x gw`` map of its patch tokens (class and register
tokens kept beside it), a Swin stage's ``H x W x C`` map is permuted to ``C x H x W``, so the
activation, histogram and CroW pictures show transformers as they show CNNs.

:func:`plot_patch_norm` draws the L2 norm of every patch token (every cell of a map): an
attention-free picture of where a transformer puts large activations (DINOv2 without registers
shows its high-norm "artefact" tokens there; Darcet et al. 2023, "Vision Transformers Need Registers").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from deepfeat.errors import UsageError
from deepfeat.models.base import Model
from deepfeat.viz.network import layer_map, overlay_figure

__all__ = ["layer_map", "patch_norms", "plot_patch_norm"]


def patch_norms(fmap: torch.Tensor) -> np.ndarray:
    """The L2 norm over channels of each cell of a ``C x H x W`` map: an ``H x W`` float32 array."""
    if fmap.dim() != 3:
        raise UsageError(f"a patch-norm map needs a C x H x W map or tokens, got shape {tuple(fmap.shape)}")
    return fmap.norm(dim=0).numpy().astype(np.float32)


def _last_block(model: Model) -> str | None:
    """A ViT's last block (before the final LayerNorm, which evens the norms out), if it has blocks."""
    blocks = getattr(model.net, "blocks", None)
    return f"blocks.{len(blocks) - 1}" if isinstance(blocks, torch.nn.Sequential) and len(blocks) else None


def plot_patch_norm(model: Model, image: Any, layer: str | None = None, *, size: Any = None,
                    alpha: float = 0.5) -> Figure:
    """The norm of every patch token of *layer* (default: a ViT's last block, else the model's default
    tap) for *image*:
    overlaid on the image (left) and one cell per patch (right), with the prefix tokens' norms."""
    from deepfeat.pipeline.network import default_layer
    from deepfeat.surgery import load_pixels

    layer = layer or _last_block(model) or default_layer(model)
    pixels, name = load_pixels(model, image, size)
    fmap, prefix = layer_map(model, pixels, layer)
    norms = patch_norms(fmap)
    h, w = pixels.shape[:2]
    fig, ax2, im = overlay_figure(pixels, norms, "magma", alpha, f"{name or 'image'} ({w} x {h}) with patch norms")
    extra = "; ".join(f"{k} {float(v[0].norm(dim=-1).mean()):.3g}" for k, v in (prefix or {}).items())
    ax2.set_title(f"|token| of {layer}, {norms.shape[0]} x {norms.shape[1]} patches, {fmap.shape[0]} channels"
                  + (f"\nprefix tokens: {extra}" if extra else ""), fontsize=10)
    fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.04)
    fig.suptitle(f"{model.arch}: patch-norm map", fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.94, bottom=0.1, top=0.84, wspace=0.15)
    return fig
