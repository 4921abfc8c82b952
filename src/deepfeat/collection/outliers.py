"""What does not belong: every vector scored by how unlike its neighbours it is, and, with classes,
the images closer to another class than to their own.

* :func:`knn_outlier_scores`: 1 - the mean cosine similarity to the *k* nearest other vectors
  (the k-NN distance of Ramaswamy et al., SIGMOD 2000, averaged over k), FAISS for the neighbours:
  exact below 200,000 vectors; above, candidates from an IVF-PQ index re-scored exactly from the
  vectors, in chunks, so memory stays the array plus the index's compressed codes.
* :func:`class_margins`: per image, cosine similarity to its own class's centre (the image left
  out) minus that to the nearest other class's centre; below 0 = closer to another class."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deepfeat.collection.linear import CHUNK, l2_rows
from deepfeat.errors import UsageError

#: candidates per neighbour asked of the compressed index above the exact size, re-scored exactly
CANDIDATES = 3
#: query rows whose candidates are gathered at once when re-scoring (x candidates x D floats)
RESCORE_CHUNK = 1024
#: training rows per inverted list of the candidate index (FAISS asks for at least 39)
TRAIN_PER_LIST = 40


def knn_outlier_scores(X: np.ndarray, k: int = 10, seed: int = 0, *, exact_max: int | None = None,
                       nprobe: int | None = None) -> np.ndarray:
    """Outlier score per row (higher = more unusual): 1 - mean cosine similarity to its k nearest
    other rows. Below *exact_max* rows (default ``FLAT_MAX_N``, 200,000) the neighbours are exact
    (FAISS flat); above, :func:`_candidate_scores` finds them with a compressed index and re-scores
    them exactly, so memory stays the array plus the index's codes."""
    from deepfeat.index import FLAT_MAX_N, Index

    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}")
    if len(X) < 2:
        raise UsageError("outliers need at least 2 vectors")
    k = min(k, len(X) - 1)
    if len(X) >= (FLAT_MAX_N if exact_max is None else exact_max):
        return _candidate_scores(X, k, seed, nprobe)
    xb = l2_rows(X)  # at most exact_max rows: a bounded copy
    index = Index.build(xb, kind="flat", metric="ip", seed=seed)
    scores = np.empty(len(X), np.float32)
    for s in range(0, len(X), CHUNK):
        D, I = index.search(xb[s:s + CHUNK], k + 1)
        rows = np.arange(s, s + len(D))[:, None]
        own = I == rows
        # drop the row itself where it was found, else the last neighbour
        keep = np.where(own.any(axis=1, keepdims=True), ~own, np.arange(k + 1) < k)
        D = np.where(I < 0, 0.0, D)
        scores[s:s + len(D)] = 1.0 - (D * keep).sum(axis=1) / k
    return scores


def _inverse_norms(X: np.ndarray) -> np.ndarray:
    inv = np.empty(len(X), np.float32)
    for s in range(0, len(X), CHUNK):
        inv[s:s + CHUNK] = 1.0 / np.maximum(np.linalg.norm(X[s:s + CHUNK], axis=1), 1e-12)
    return inv


def _pq_m(d: int) -> int:
    """Sub-quantizers of the candidate index: the largest divisor of d that is <= d/4 (4 dims each)."""
    return max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)


def _candidate_index(X: np.ndarray, inv: np.ndarray, seed: int, nprobe: int | None):
    """FAISS ``IVF{nlist},PQ{d/4}x4fs`` (4-bit fast-scan PQ: d/8 bytes per row, nlist as
    ``deepfeat.index`` ``ivf_nlist``) over the L2-normalised rows, trained on a seeded sample of
    :data:`TRAIN_PER_LIST` x nlist rows and filled chunk by chunk: no copy of *X*. Only candidates come from it."""
    from deepfeat.index import ivf_nlist
    from deepfeat.index.checks import _faiss

    faiss = _faiss()
    n, d = X.shape
    nlist = ivf_nlist(n)
    index = faiss.index_factory(d, f"IVF{nlist},PQ{_pq_m(d)}x4fs", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    ivf.pq.cp.seed = seed
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False))
    index.train(np.ascontiguousarray(X[rows] * inv[rows, None], np.float32))
    for s in range(0, n, CHUNK):
        index.add(np.ascontiguousarray(X[s:s + CHUNK] * inv[s:s + CHUNK, None], np.float32))
    ivf.nprobe = min(nlist, nprobe or max(8, nlist // 64))
    return index


def _candidate_scores(X: np.ndarray, k: int, seed: int, nprobe: int | None) -> np.ndarray:
    """Outlier scores of a large *X*: each row's :data:`CANDIDATES` x (k + 1) nearest by the
    compressed index, their cosine similarities recomputed exactly from *X* (the re-ranking of
    Jegou et al., "Searching in one billion vectors", ICASSP 2011), the best k other rows kept.
    Memory: *X*, one float32 per row, the index's codes and one chunk of gathered candidates."""
    inv = _inverse_norms(X)
    index = _candidate_index(X, inv, seed, nprobe)
    kc = min(len(X), CANDIDATES * (k + 1))
    scores = np.empty(len(X), np.float32)
    for s in range(0, len(X), CHUNK):
        xq = np.ascontiguousarray(X[s:s + CHUNK] * inv[s:s + CHUNK, None], np.float32)
        _, I = index.search(xq, kc)  # ids = row numbers (added in order)
        for t in range(0, len(xq), RESCORE_CHUNK):
            q, cand = xq[t:t + RESCORE_CHUNK], I[t:t + RESCORE_CHUNK]
            rows = np.arange(s + t, s + t + len(q))[:, None]
            safe = np.where(cand < 0, 0, cand)
            sims = np.einsum("nkd,nd->nk", X[safe.ravel()].reshape(*safe.shape, -1), q) * inv[safe]
            sims[(cand < 0) | (cand == rows)] = -np.inf  # not found, or the row itself
            best = -np.partition(-sims, k - 1, axis=1)[:, :k]
            scores[s + t:s + t + len(q)] = 1.0 - np.where(np.isfinite(best), best, 0.0).sum(axis=1) / k
    return scores


def class_margins(X: np.ndarray, labels: Sequence[int], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(margin, nearest other class) per row: cos(x, own centre without x) - max cos(x, other centre)."""
    y = np.asarray(labels, np.int64)
    sums = np.zeros((n_classes, X.shape[1]), np.float64)
    for s in range(0, len(X), CHUNK):  # two passes over X in chunks: no normalised copy of it
        np.add.at(sums, y[s:s + CHUNK], l2_rows(X[s:s + CHUNK]))
    counts = np.bincount(y, minlength=n_classes)
    centres = l2_rows(sums.astype(np.float32))
    margin = np.empty(len(X), np.float32)
    other = np.empty(len(X), np.int64)
    for s in range(0, len(X), CHUNK):
        xs, ys = l2_rows(X[s:s + CHUNK]), y[s:s + CHUNK]
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
