"""The losses of fine-tuning: cross-entropy of the classifier (stages ``head`` and ``full``,
the metric-learning head re-fit), and the contrastive and triplet losses of ``--loss``
(see :mod:`deepfeat.finetune.metric` for the tuples they are computed on)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_loss(out: torch.Tensor, y: torch.Tensor, probs: bool, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits *out* (N x C) for labels *y*; with *probs*, the NLL of
    probabilities."""
    out = out.float().flatten(1)
    if probs:  # a network ending in Softmax (Caffe): NLL of its probabilities
        return F.nll_loss(out.clamp_min(1e-12).log(), y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


def contrastive_loss(q: torch.Tensor, others: torch.Tensor, is_pos: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over pairs (q, other) of the contrastive loss; *q* is D, *others* K x D."""
    d = (others - q[None]).norm(dim=1)
    pos = 0.5 * d.pow(2)
    neg = 0.5 * (margin - d).clamp_min(0).pow(2)
    return torch.where(is_pos, pos, neg).sum()


def triplet_loss(q: torch.Tensor, p: torch.Tensor, negs: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over negatives of ``max(0, margin + |q - p|^2 - |q - n|^2)``; *q*, *p* are D, *negs* K x D."""
    d_pos = (q - p).pow(2).sum()
    d_neg = (negs - q[None]).pow(2).sum(dim=1)
    return (margin + d_pos - d_neg).clamp_min(0).sum()


#: default margins, as in cirtorch
DEFAULT_MARGIN = {"contrastive": 0.7, "triplet": 0.1}
