"""What does not belong: every vector scored by how unlike its neighbours it is, and, with classes,
the images closer to another class than to their own.

* :func:`knn_outlier_scores`: 1 - the mean cosine similarity to the *k* nearest other vectors
  (the k-NN distance of Ramaswamy et al., SIGMOD 2000, averaged over k), FAISS for the neighbours
  (exact below 200,000 vectors, an IVF index above: ``deepfeat.index`` ``auto``), in chunks.
* :func:`class_margins`: per image, cosine similarity to its own class's centre (the image left
  out) minus that to the nearest other class's centre; below 0 = closer to another class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deepfeat.collection.linear import CHUNK, l2_rows
from deepfeat.errors import UsageError


def knn_outlier_scores(X: np.ndarray, k: int = 10, seed: int = 0) -> np.ndarray:
    """Outlier score per row (higher = more unusual): 1 - mean cosine similarity to its k nearest
    other rows."""
    from deepfeat.index import Index

    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}")
    if len(X) < 2:
        raise UsageError("outliers need at least 2 vectors")
    k = min(k, len(X) - 1)
    xb = l2_rows(X)
    index = Index.build(xb, kind="auto", metric="ip", seed=seed)
    scores = np.empty(len(X), np.float32)
    for s in range(0, len(X), CHUNK):
        D, I = index.search(xb[s:s + CHUNK], k + 1)
        rows = np.arange(s, s + len(D))[:, None]
        own = I == rows
        # drop the row itself where it was found, else the last neighbour
        keep = np.where(own.any(axis=1, keepdims=True), ~own, np.arange(k + 1) < k)
        D = np.where(I < 0, 0.0, D)  # an approximate index may return fewer than k neighbours
        scores[s:s + len(D)] = 1.0 - (D * keep).sum(axis=1) / k
    return scores


def class_margins(X: np.ndarray, labels: Sequence[int], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(margin, nearest other class) per row: cos(x, own centre without x) - max cos(x, other centre)."""
    y = np.asarray(labels, np.int64)
    xb = l2_rows(X)
    sums = np.zeros((n_classes, xb.shape[1]), np.float64)
    np.add.at(sums, y, xb)
    counts = np.bincount(y, minlength=n_classes)
    centres = l2_rows(sums.astype(np.float32))
    margin = np.empty(len(xb), np.float32)
    other = np.empty(len(xb), np.int64)
    for s in range(0, len(xb), CHUNK):
        xs, ys = xb[s:s + CHUNK], y[s:s + CHUNK]
        sim = xs @ centres.T
        own = sums[ys] - xs  # the class without this image
        alone = counts[ys] <= 1
        own_sim = np.where(alone, np.nan, (own * xs).sum(1) / np.maximum(np.linalg.norm(own, axis=1), 1e-12))
        sim[np.arange(len(xs)), ys] = -np.inf
        other[s:s + len(xs)] = sim.argmax(axis=1)
        margin[s:s + len(xs)] = own_sim - sim.max(axis=1)
    return margin, other


def outlier_report(X: np.ndarray, paths: Sequence[str], k: int = 10, gt: str | None = None) -> dict:
    """Images ranked most unusual first. Without *gt*: by :func:`knn_outlier_scores`. With
    ``gt="folders"``: by class margin (lowest first; score = -margin), with the nearest other class."""
    import os

    if gt is None:
        s = knn_outlier_scores(X, k)
        order = np.argsort(-s, kind="stable")
        return {"how": f"score = 1 - mean cosine similarity to the {min(k, len(X) - 1)} nearest neighbours",
                "ranked": [{"path": paths[i], "score": float(s[i])} for i in order]}
    if gt != "folders":
        raise UsageError(f"--gt {gt!r}: only folders is supported here")
    folders = [os.path.basename(os.path.dirname(p)) for p in paths]
    classes = sorted(set(folders))
    if len(classes) < 2:
        raise UsageError("--gt folders needs images in at least two folders")
    y = np.array([classes.index(f) for f in folders])
    margin, other = class_margins(X, y, len(classes))
    order = np.argsort(np.nan_to_num(margin, nan=np.inf), kind="stable")
    return {"how": "score = -(cos to own folder's centre - cos to nearest other folder's centre); "
                   "score > 0: closer to another folder",
            "ranked": [{"path": paths[i], "score": float(-margin[i]), "margin": float(margin[i]),
                        "folder": classes[y[i]], "nearest_class": classes[other[i]]}
                       for i in order if not np.isnan(margin[i])]}
