"""``deepfeat map``: a store's 2-D layout (:mod:`.layout`) with its colourings (folder, your
classifier's label, cluster, outlier score) as one self-contained interactive HTML page (the
script of :mod:`.mapscript`, thumbnails as data: URIs, nothing fetched) and a PNG for reports."""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepfeat.collection.layout import MAX_POINTS, PLACE_K, Layout, layout
from deepfeat.collection.mapscript import MAP_CSS, MAP_JS
from deepfeat.collection.pages import STYLE, thumbnail_uri
from deepfeat.errors import UsageError

log = logging.getLogger(__name__)

COLOUR_BY = ("folder", "label", "cluster", "outlier")
#: thumbnails embedded by default (each ~3-5 KB at 96 px); the other points are drawn as dots
MAX_THUMBS = 2000
MAP_THUMB = 96


@dataclass
class Colouring:
    """Per point either a category index into ``names`` (-1 = none) or a continuous ``score``."""

    kind: str  # "category" or "score"
    values: np.ndarray
    names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "score":
            return {"kind": "score", "values": [round(float(v), 5) for v in self.values]}
        return {"kind": "category", "values": [int(v) for v in self.values], "names": list(self.names)}


@dataclass
class CollectionMap:
    """A laid-out collection: ``layout`` of the rows whose files are ``paths``, and colourings by name."""

    paths: list[str]
    layout: Layout
    colourings: dict[str, Colouring]
    title: str = "map"


def categories(labels: Sequence[str]) -> Colouring:
    """A category colouring, the largest category first (so it gets the first colour)."""
    names, counts = np.unique(np.asarray(labels, dtype=object).astype(str), return_counts=True)
    order = [str(names[i]) for i in np.argsort(-counts, kind="stable")]
    index = {name: i for i, name in enumerate(order)}
    return Colouring("category", np.array([index[str(v)] for v in labels], np.int64), order)


def folder_colouring(paths: Sequence[str]) -> Colouring:
    return categories([os.path.basename(os.path.dirname(p)) or "." for p in paths])


def label_colouring(X: np.ndarray, classifier: str | os.PathLike) -> Colouring:
    """The labels of a saved classifier (``unknown`` below its threshold); the store's descriptors
    must be those the classifier was fitted on (same dimension; same recipe is the user's call)."""
    from deepfeat.collection.classifier import Classifier

    clf = Classifier.load(classifier)
    idx, _ = clf.predict(X)
    names = clf.classes + ["unknown"]
    return categories([names[i] for i in idx])


def cluster_colouring(X: np.ndarray, k: int | None, seed: int = 0) -> Colouring:
    from deepfeat.collection.clusters import cluster

    c = cluster(X, k, seed=seed, n_representatives=1)
    return categories([f"cluster {i}" for i in c.labels])


def outlier_colouring(X: np.ndarray, k: int = 10) -> Colouring:
    from deepfeat.collection.outliers import knn_outlier_scores

    return Colouring("score", knn_outlier_scores(X, k))


def build_map(X: np.ndarray, paths: Sequence[str], *, method: str = "auto", colour_by: Sequence[str] = ("folder",),
              classifier: str | os.PathLike | None = None, k: int | None = None, outlier_k: int = 10,
              max_points: int = MAX_POINTS, place_k: int = PLACE_K, seed: int = 0,
              title: str = "map") -> CollectionMap:
    """Lay out *X* (rows = *paths*) and compute the colourings named in *colour_by* (the first is
    the page's initial one): folder, label (needs *classifier*), cluster (*k*, or automatic),
    outlier (k-NN score with *outlier_k*)."""
    bad = [c for c in colour_by if c not in COLOUR_BY]
    if bad or not colour_by:
        raise UsageError(f"--colour-by {','.join(bad) or '(nothing)'}: choose from {', '.join(COLOUR_BY)}")
    if "label" in colour_by and classifier is None:
        raise UsageError("--colour-by label needs --classifier CLF (a folder made by deepfeat fit-classifier)")
    if len(paths) != len(X):
        raise UsageError(f"{len(X)} vectors but {len(paths)} paths")
    lay = layout(X, method, max_points=max_points, k=place_k, seed=seed)
    colourings: dict[str, Colouring] = {}
    for name in dict.fromkeys(colour_by):
        if name == "folder":
            colourings[name] = folder_colouring(paths)
        elif name == "label":
            colourings[name] = label_colouring(X, classifier)
        elif name == "cluster":
            colourings[name] = cluster_colouring(X, k, seed)
        else:
            colourings[name] = outlier_colouring(X, outlier_k)
    return CollectionMap(list(paths), lay, colourings, title)


def thumbnails(paths: Sequence[str], max_thumbs: int = MAX_THUMBS, size: int = MAP_THUMB,
               seed: int = 0) -> list[str | None]:
    """Data: URIs for at most *max_thumbs* of *paths* (a seeded random choice when there are more),
    None for the rest and for files that cannot be read."""
    out: list[str | None] = [None] * len(paths)
    rows = np.arange(len(paths))
    if len(rows) > max_thumbs:
        rows = np.sort(np.random.default_rng(seed).choice(len(paths), max_thumbs, replace=False))
    for i in rows:
        out[int(i)] = thumbnail_uri(paths[int(i)], size)
    return out


def map_data(m: CollectionMap, thumbs: Sequence[str | None]) -> dict[str, Any]:
    """The JSON object the map script reads (see :mod:`.mapscript`)."""
    return {"title": m.title, "how": m.layout.how,
            "xy": [[round(float(a), 5), round(float(b), 5)] for a, b in m.layout.xy],
            "paths": list(m.paths), "thumbs": list(thumbs),
            "colourings": {name: c.to_dict() for name, c in m.colourings.items()}}


def json_for_script(obj: Any) -> str:
    """JSON that cannot close its <script> element early."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


def map_html(m: CollectionMap, thumbs: Sequence[str | None]) -> str:
    n_thumbs = sum(t is not None for t in thumbs)
    sub = (f"{len(m.paths)} images; {m.layout.how}; {n_thumbs} thumbnails. Wheel: zoom; drag: pan; "
           f"hover: a preview; click: details.")
    return "".join([
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(m.title)}</title>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        f"<style>{STYLE}{MAP_CSS}</style></head><body>",
        f"<header class=top><h1>deepfeat <span>{html.escape(m.title)}</span></h1><p>{html.escape(sub)}</p></header>",
        "<div id=mapwrap><canvas id=map></canvas>",
        "<div class=mapbar><label>colour by <select id=colour-by></select></label>",
        "<button id=zoom-in title='zoom in'>+</button><button id=zoom-out title='zoom out'>&minus;</button>",
        "<button id=zoom-reset title='whole map'>reset</button></div>",
        "<div id=legend></div><div id=tip hidden></div><div id=picked hidden></div></div>",
        f"<script type=application/json id=map-data>{json_for_script(map_data(m, thumbs))}</script>",
        f"<script>{MAP_JS}</script></body></html>\n"])


def write_map_html(path: str | os.PathLike, m: CollectionMap, *, max_thumbs: int = MAX_THUMBS, seed: int = 0) -> int:
    """Write the page; returns how many thumbnails it embeds."""
    thumbs = thumbnails(m.paths, max_thumbs, seed=seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write(map_html(m, thumbs))
    return sum(t is not None for t in thumbs)


def write_map_png(path: str | os.PathLike, m: CollectionMap, colour_by: str | None = None, dpi: int = 150) -> None:
    """A scatter plot of the layout coloured by one colouring (the first by default), for reports."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("the PNG needs matplotlib: pip install 'deepfeat[viz]'") from None
    name = colour_by or next(iter(m.colourings))
    c = m.colourings[name]
    xy = m.layout.xy
    fig, ax = plt.subplots(figsize=(8, 8))
    size = max(2.0, min(30.0, 6000.0 / max(1, len(xy))))
    if c.kind == "score":
        sc = ax.scatter(xy[:, 0], 1 - xy[:, 1], c=c.values, s=size, cmap="viridis", linewidths=0)
        fig.colorbar(sc, ax=ax, shrink=0.7, label=f"{name} score")
    else:
        cmap = plt.get_cmap("tab20")
        for j, label in enumerate(c.names):
            sel = c.values == j
            ax.scatter(xy[sel, 0], 1 - xy[sel, 1], s=size, linewidths=0, label=label if j < 20 else None,
                       color=cmap(j % 20) if j < 20 else "#adb5bd")
        if len(c.names) <= 30:
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=2, frameon=False)
    ax.set_title(f"{m.title}: {len(xy)} images, coloured by {name}\n{m.layout.method}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
