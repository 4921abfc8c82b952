"""A 2-D layout of a collection for a map: PCA, t-SNE (scikit-learn) or UMAP (``umap-learn``, where
installed) of the L2-normalised descriptors.

Large collections: a seeded random subsample of at most ``max_points`` vectors is laid out, and
every other vector is placed at the mean 2-D position of its ``k`` nearest laid-out neighbours
(cosine, FAISS, in chunks), so memory and time stay bounded by the subsample.

t-SNE and UMAP start from a PCA to :data:`PRE_DIMS` dimensions (standard practice: van der Maaten
& Hinton 2008 use 30-50); PCA gives the two leading principal components directly."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from deepfeat.collection.linear import CHUNK, l2_rows, require_sklearn
from deepfeat.errors import UsageError

log = logging.getLogger(__name__)

METHODS = ("auto", "pca", "tsne", "umap")
#: vectors laid out by the method itself by default; the rest are placed by their neighbours
MAX_POINTS = 5000
#: laid-out neighbours averaged to place a vector outside the subsample
PLACE_K = 10
PRE_DIMS = 50


@dataclass
class Layout:
    """``xy`` (N x 2 float32, scaled into [0, 1] x [0, 1]), which rows were laid out by the method
    (``laid_out``, a bool mask; the others were placed by their neighbours) and how."""

    xy: np.ndarray
    laid_out: np.ndarray
    method: str
    how: str


def umap_available() -> bool:
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_method(method: str) -> str:
    if method not in METHODS:
        raise UsageError(f"unknown layout method {method!r}; choose from {', '.join(METHODS)}")
    if method == "auto":
        return "umap" if umap_available() else "tsne"
    if method == "umap" and not umap_available():
        raise UsageError("--method umap needs umap-learn: pip install umap-learn (or use tsne or pca)")
    return method


def pca(X: np.ndarray, dims: int) -> np.ndarray:
    """The first *dims* principal components of the rows of *X* (centred; SVD)."""
    Z = X.astype(np.float64) - X.mean(axis=0)
    dims = min(dims, *Z.shape)
    U, S, _ = np.linalg.svd(Z, full_matrices=False)
    return (U[:, :dims] * S[:dims]).astype(np.float32)


def embed_2d(X: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """2-D coordinates of the (already L2-normalised) rows of *X* by *method* (pca, tsne, umap)."""
    if len(X) < 3:  # too few for t-SNE or UMAP; PCA of fewer rows than 2 gives fewer columns
        xy = pca(X, 2)
        return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    if method == "pca":
        return pca(X, 2)
    pre = pca(X, PRE_DIMS) if X.shape[1] > PRE_DIMS else X
    if method == "tsne":
        require_sklearn()
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (len(X) - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                    metric="cosine").fit_transform(pre).astype(np.float32)
    import umap

    return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(pre).astype(np.float32)


def place_by_neighbours(xb: np.ndarray, xy_b: np.ndarray, xq: np.ndarray, k: int = PLACE_K,
                        rows: np.ndarray | None = None) -> np.ndarray:
    """2-D positions of the query rows *xq* (of its *rows* only, when given): the mean position
    *xy_b* of their *k* nearest rows of *xb* (cosine; *xb* L2-normalised, each chunk of *xq*
    normalised as it is read), by FAISS in chunks: no copy of *xq* is made."""
    from deepfeat.index import Index

    k = min(k, len(xb))
    index = Index.build(xb, kind="flat", metric="ip")
    rows = np.arange(len(xq)) if rows is None else rows
    out = np.empty((len(rows), 2), np.float32)
    for s in range(0, len(rows), CHUNK):
        _, I = index.search(l2_rows(xq[rows[s:s + CHUNK]]), k)
        out[s:s + len(I)] = xy_b[I].mean(axis=1)
    return out


def normalise(xy: np.ndarray) -> np.ndarray:
    """Scale into the unit square, keeping the aspect ratio (a map should not stretch an axis)."""
    lo = xy.min(axis=0)
    span = float((xy.max(axis=0) - lo).max()) or 1.0
    out = (xy - lo) / span
    return (out + (1.0 - out.max(axis=0)) / 2).astype(np.float32)  # centred in the square


def layout(X: np.ndarray, method: str = "auto", *, max_points: int = MAX_POINTS, k: int = PLACE_K,
           seed: int = 0) -> Layout:
    """Lay out the N x D descriptors *X* in 2-D (see the module docstring)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or not len(X):
        raise UsageError(f"a map needs N x D descriptors, got shape {X.shape}")
    if max_points < 3:
        raise UsageError(f"--max-points must be at least 3, not {max_points}")
    method = resolve_method(method)
    n = len(X)
    laid = np.zeros(n, bool)
    if n > max_points:
        laid[np.random.default_rng(seed).choice(n, max_points, replace=False)] = True
    else:
        laid[:] = True
    sample = l2_rows(X[laid])  # the subsample only: a large X is never copied whole
    xy = np.empty((n, 2), np.float32)
    xy[laid] = embed_2d(sample, method, seed)
    how = f"{method} of {int(laid.sum())} L2-normalised descriptors"
    if not laid.all():
        xy[~laid] = place_by_neighbours(sample, xy[laid], X, k, rows=np.nonzero(~laid)[0])
        how = (f"{method} of a random subsample of {int(laid.sum())} of {n} descriptors (seed {seed}); "
               f"the other {int((~laid).sum())} placed at the mean position of their {min(k, int(laid.sum()))} "
               f"nearest laid-out neighbours (cosine, FAISS)")
    log.info("layout: %s", how)
    return Layout(normalise(xy), laid, method, how)
