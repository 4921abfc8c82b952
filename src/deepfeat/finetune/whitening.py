"""The learned whitening of ``--loss contrastive|triplet --whiten DIM``: its start (a PCA of
the training descriptors) and its application to descriptor rows.

With ``--whiten DIM`` the descriptor is cirtorch's whitened one,
``L2(W L2(GeM(x)) + b)``, with the linear whitening ``W`` (DIM x D) and ``b`` learned
end to end with the network (base learning rate, weight decay on ``W``). It starts as
the PCA of the descriptors of the training images (``W`` = the leading DIM principal
directions, ``b = -W mean``): a rotation with centring when DIM = D, the PCA reduction
otherwise. The trained whitening is saved as the run's ``whitening.npz``, a fitted
post-processing chain ``l2,lw:DIM,l2`` that ``deepfeat extract --post RUN/whitening.npz``
(or ``deepfeat postprocess``) applies to the pooled features, so the whitening travels
with the store like any fitted PCA.
"""

from __future__ import annotations

import numpy as np

#: the learned whitening of a run, a fitted post-processing chain (``l2,lw:DIM,l2``)
WHITENING_FILE = "whitening.npz"


def l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows of *x* divided by their L2 norm (at least 1e-12)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pca_whitening(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The start of the learned whitening, float64: ``W`` (dim x D) = the leading *dim*
    principal directions of the rows of *x*, each with a deterministic sign, and
    ``b = -W mean``."""
    mean = x.mean(0, dtype=np.float64)
    cov = np.cov(x.astype(np.float64), rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    W = vecs[:, np.argsort(-vals, kind="stable")[:dim]].T
    W *= np.where(W.sum(1, keepdims=True) < 0, -1.0, 1.0)  # a deterministic sign per direction
    return W, -W @ mean


def whiten_rows(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``L2(W x + b)`` of each row of *x* (computed in float64), as float32."""
    y = x.astype(np.float64) @ W.T + b
    return l2_rows(y).astype(np.float32)
