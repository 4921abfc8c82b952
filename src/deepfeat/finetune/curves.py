"""The training curves of a fine-tuning run as a picture: ``RUN_DIR/curves.png``.

Three panels over the epochs (numbered across the stages, the head/full boundary
marked): training and validation loss; training and validation accuracy; and the
validation retrieval mAP / mP@10 when ``--eval-retrieval`` measured them. Drawn with
matplotlib (the ``viz`` extra) on the Agg canvas; without matplotlib nothing is drawn
and :func:`write_curves` says so by returning None.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

CURVES_FILE = "curves.png"


def _series(history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(h["epoch"]), 100 * float(h[key]) if key != "train_loss" and key != "val_loss" else float(h[key]))
           for h in history if h.get(key) is not None]
    return [e for e, _ in pts], [v for _, v in pts]


def plot_curves(history: Sequence[dict], title: str = ""):
    """A matplotlib Figure of the loss, accuracy and (if measured) mAP per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    has_map = any(h.get("val_map") is not None for h in history)
    panels = 3 if has_map else 2
    fig = Figure(figsize=(4.2 * panels, 3.4), dpi=100)
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no global pyplot state
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    spec = [("loss", [("train_loss", "train"), ("val_loss", "validation")]),
            ("accuracy (%)", [("train_acc", "train"), ("val_acc", "validation")])]
    if has_map:
        spec.append(("retrieval on validation (%)", [("val_map", "mAP"), ("val_mp10", "mP@10")]))
    first_full = next((int(h["epoch"]) for h in history if h.get("stage") == "full"), None)
    for ax, (ylabel, keys) in zip(axes, spec):
        for key, label in keys:
            x, y = _series(history, key)
            if x:
                ax.plot(x, y, marker="o", markersize=3, label=label)
        if first_full is not None and first_full > 1:
            ax.axvline(first_full - 0.5, color="0.6", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch (head stage | full stage)" if first_full and first_full > 1 else "epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_curves(run: str | os.PathLike, history: Sequence[dict], title: str = "") -> Path | None:
    """Write ``RUN/curves.png`` (atomically); None, with a debug log line, without matplotlib
    or without any epoch yet."""
    if not history:
        return None
    try:
        fig = plot_curves(history, title)
    except ImportError:
        log.debug("matplotlib is not installed (pip install 'deepfeat[viz]'): no %s", CURVES_FILE)
        return None
    import io

    from deepfeat.store import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format="png")
    path = Path(run) / CURVES_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path
