"""Poolings that read a transformer's prefix tokens rather than its patch map.

A token tap is split by its layout (:mod:`deepfeat.models.layouts`) into the ``N x C x H x W`` map of
its patch tokens, which every spatial pooling reads (prefix excluded), and its prefix tokens, handed
to the pooling as ``tokens = {"cls": N x c x C, "reg": N x r x C}`` (absent kinds left out):

* ``cls``: the (first) class token, the descriptor of DINO/DINOv2's k-NN and copy-detection papers;
* ``reg``: the mean of the register tokens (Darcet et al., Vision transformers need registers).

``cls+gem`` concatenates the class token with GeM over the patches (DINO's copy-detection
descriptor: class token joined to GeM of the patch tokens).
"""

from __future__ import annotations

import torch

from deepfeat.errors import UsageError


def _need(tokens: dict | None, key: str, name: str, what: str) -> torch.Tensor:
    t = (tokens or {}).get(key)
    if t is None or t.shape[1] == 0:
        raise UsageError(f"pooling {name!r} needs {what}; this tap has none (it is a map, a vector, or a token "
                         f"sequence without them): use a spatial pooling such as gem or avg")
    return t


def cls_token(tokens: dict | None, name: str = "cls") -> torch.Tensor:
    """``N x C``: the first class token."""
    return _need(tokens, "cls", name, "a class token (a ViT-like tap: norm, blocks.N)")[:, 0]


def reg_mean(tokens: dict | None, name: str = "reg") -> torch.Tensor:
    """``N x C``: the mean of the register tokens."""
    return _need(tokens, "reg", name, "register tokens (a model with registers, e.g. vit_*_reg4_*)").mean(dim=1)
