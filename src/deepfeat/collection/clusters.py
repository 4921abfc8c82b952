"""Clusters of a collection: spherical k-means on FAISS (cosine on L2-normalised descriptors), with k
given or chosen automatically, and the members nearest to each centre as its representatives.

Automatic k (``k=None``), two choices measured in docs/explore.md:

* ``hdbscan`` (default): scikit-learn's HDBSCAN (Campello et al. 2013) on a PCA to
  :data:`HDBSCAN_DIMS` dimensions of a sample, smallest cluster max(3, N/200) sample vectors;
  its clusters' means then seed the assignment of every vector (noise included);
* ``silhouette``: k-means for every k of a range, keeping the k of the highest mean
  silhouette (Rousseeuw 1987, cosine distance) on a seeded sample of at most
  :data:`SILHOUETTE_SAMPLE` vectors (slower, and worse on Flowers 17).

Memory stays bounded for large stores: FAISS trains on at most ``max_points_per_centroid`` x k
vectors, and every vector is assigned to its nearest centre in chunks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepfeat.collection.linear import CHUNK, l2_rows, require_sklearn
from deepfeat.errors import UsageError

log = logging.getLogger(__name__)

AUTO_METHODS = ("hdbscan", "silhouette")
SILHOUETTE_SAMPLE = 5000
HDBSCAN_SAMPLE = 20000
HDBSCAN_DIMS = 32


@dataclass
class Clustering:
    """Cluster ``labels[i]`` of each row, the L2-normalised ``centroids`` (k x D), per cluster its
    ``representatives`` (rows nearest the centre, best first) and how k was chosen."""

    labels: np.ndarray
    centroids: np.ndarray
    representatives: list[list[int]]
    k: int
    how: str
    scores: dict[int, float] = field(default_factory=dict)  # the criterion per k tried

    def members(self, c: int) -> np.ndarray:
        return np.nonzero(self.labels == c)[0]

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UsageError("clustering needs FAISS: pip install 'deepfeat[search]'") from None
    return faiss


def assign(X: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre (cosine) of every row, in chunks: (labels, similarity to it)."""
    from deepfeat.index import Index

    index = Index.build(np.ascontiguousarray(centroids, np.float32), kind="flat", metric="ip")
    labels = np.empty(len(X), np.int64)
    sims = np.empty(len(X), np.float32)
    for s in range(0, len(X), CHUNK):
        D, I = index.search(l2_rows(X[s:s + CHUNK]), 1)
        labels[s:s + len(D)], sims[s:s + len(D)] = I[:, 0], D[:, 0]
    return labels, sims


def spherical_kmeans(X: np.ndarray, k: int, seed: int = 0, niter: int = 25, nredo: int = 1) -> np.ndarray:
    """k x D unit centroids of FAISS's spherical k-means on the L2-normalised rows of *X*."""
    faiss = _faiss()
    if not 1 <= k <= len(X):
        raise UsageError(f"k must be between 1 and the number of vectors ({len(X)}), not {k}")
    km = faiss.Kmeans(X.shape[1], k, niter=niter, nredo=nredo, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=256)
    sample = X
    if len(X) > 256 * k:  # FAISS would subsample too; doing it here keeps the copy small
        sample = X[np.sort(np.random.default_rng(seed).choice(len(X), 256 * k, replace=False))]
    km.train(l2_rows(sample))
    return np.ascontiguousarray(km.centroids, np.float32)


def representatives(labels: np.ndarray, sims: np.ndarray, k: int, n: int = 5) -> list[list[int]]:
    """Per cluster, the *n* member rows most similar to its centre."""
    order = np.lexsort((-sims, labels))  # by cluster, then most similar first
    starts = np.searchsorted(labels[order], np.arange(k + 1))
    return [order[starts[c]:starts[c + 1]][:n].tolist() for c in range(k)]


def silhouette_k(X: np.ndarray, ks: Sequence[int], seed: int = 0) -> tuple[int, dict[int, float]]:
    """The k of *ks* whose k-means has the highest mean cosine silhouette on a seeded sample."""
    require_sklearn()
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(seed)
    S = X if len(X) <= SILHOUETTE_SAMPLE else X[np.sort(rng.choice(len(X), SILHOUETTE_SAMPLE, replace=False))]
    S = l2_rows(S)
    scores = {}
    for k in ks:
        lab, _ = assign(S, spherical_kmeans(S, k, seed, nredo=3))
        scores[k] = float(silhouette_score(S, lab, metric="cosine")) if len(set(lab.tolist())) > 1 else -1.0
    best = max(scores, key=lambda k: scores[k])
    return best, scores


def hdbscan_centroids(X: np.ndarray, seed: int = 0, min_cluster_size: int | None = None) -> np.ndarray:
    """Centres of HDBSCAN's clusters on a PCA of a sample (noise points left out)."""
    require_sklearn()
    from sklearn.cluster import HDBSCAN
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    S = X if len(X) <= HDBSCAN_SAMPLE else X[np.sort(rng.choice(len(X), HDBSCAN_SAMPLE, replace=False))]
    S = l2_rows(S)
    Z = PCA(n_components=min(HDBSCAN_DIMS, *S.shape), random_state=seed).fit_transform(S)
    mcs = min_cluster_size or max(3, round(len(S) / 200))
    lab = HDBSCAN(min_cluster_size=mcs, copy=True).fit_predict(Z)
    found = sorted(set(lab.tolist()) - {-1})
    if len(found) < 2:
        raise UsageError(f"HDBSCAN found {len(found)} cluster(s) in {len(S)} vectors; give --k or use silhouette")
    return l2_rows(np.stack([S[lab == c].mean(axis=0) for c in found]))


def default_k_range(n: int) -> list[int]:
    """k from 2 to about 2 sqrt(N/2) (capped at 60): the range the silhouette criterion searches."""
    top = int(min(60, max(2, round(2 * np.sqrt(n / 2)))))
    return list(range(2, min(top, n - 1) + 1))


def cluster(X: np.ndarray, k: int | None = None, *, auto: str = "hdbscan", ks: Sequence[int] | None = None,
            seed: int = 0, n_representatives: int = 5) -> Clustering:
    """Cluster the rows of *X* into *k* groups, or into an automatically chosen number (*auto*)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or len(X) < 3:
        raise UsageError(f"clustering needs at least 3 vectors, got an array of shape {X.shape}")
    scores: dict[int, float] = {}
    if k is not None:
        centroids, how = spherical_kmeans(X, k, seed, nredo=3), f"k = {k} (given)"
    elif auto == "silhouette":
        kk, scores = silhouette_k(X, ks or default_k_range(len(X)), seed)
        centroids = spherical_kmeans(X, kk, seed, nredo=3)
        how = f"k = {kk}: highest mean silhouette (cosine) for k in {min(scores)}..{max(scores)}"
    elif auto == "hdbscan":
        centroids = hdbscan_centroids(X, seed)
        how = f"k = {len(centroids)}: HDBSCAN on a {HDBSCAN_DIMS}-d PCA"
    else:
        raise UsageError(f"unknown automatic choice {auto!r}; choose from {', '.join(AUTO_METHODS)}")
    labels, sims = assign(X, centroids)
    used = np.unique(labels)  # a centre that won no vector is dropped; labels renumbered 0..k-1
    remap = np.full(len(centroids), -1, np.int64)
    remap[used] = np.arange(len(used))
    labels, centroids = remap[labels], centroids[used]
    reps = representatives(labels, sims, len(used), n_representatives)
    log.info("%d vectors -> %d clusters (%s)", len(X), len(used), how)
    return Clustering(labels, centroids, reps, len(used), how, scores)


def agreement(truth: Sequence[Any], labels: Sequence[int]) -> dict[str, float]:
    """NMI and ARI of a clustering against true classes (scikit-learn's definitions)."""
    require_sklearn()
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"nmi": float(normalized_mutual_info_score(truth, labels)),
            "ari": float(adjusted_rand_score(truth, labels))}
