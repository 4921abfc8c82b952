"""PNG figures for reports: a classifier's confusion matrix (matplotlib, the ``viz`` extra)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from deepfeat.errors import UsageError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("figures need matplotlib: pip install 'deepfeat[viz]'") from None
    return plt


def confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: str | os.PathLike,
                  title: str = "") -> None:
    """The confusion matrix (rows = true class, columns = predicted) with counts, row-normalised colours."""
    plt = _pyplot()
    conf = np.asarray(confusion, dtype=float)
    share = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), list(classes), rotation=90, fontsize=8)
    ax.set_yticks(range(n), list(classes), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            if conf[i, j]:
                ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
