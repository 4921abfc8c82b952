"""Regional diffusion (Iscen, Tolias, Avrithis, Furon & Chum, "Efficient diffusion on
region manifolds: recovering small objects with compact CNN representations", CVPR 2017,
the paper's main setting; the authors' code is ``ahmetius/diffusion-retrieval``).

Every database image is a set of regional descriptors (the R-MAC grid of a tapped map,
each region pooled and L2-normalised: ``deepfeat local-features STORE --extractor
regions``, read through :class:`deepfeat.localfeat.cache.LocalFeatureCache`). Then:

1. **Offline**: the mutual k-NN graph of all database *regions*
   (:func:`~deepfeat.rerank.diffusion.knn_graph` over a FAISS index of the regions),
   affinities ``max(0, s)^gamma``; and each image's generalized-max-pooling weights
   ``c = (V V^T + I)^-1 1`` over its regions V (Murray & Perronnin, CVPR 2014; the
   authors' ``gmpweights.m``, lambda = 1).
2. **Per query**: the regions of the query's top-``trunc`` global shortlist images are
   the subgraph; each query region finds its ``kq`` nearest among them, similarities are
   summed per database region, the ``kq`` largest sums raised to ``gamma`` make ``y``
   (``ymake.m``); ``(I - alpha S) f = y`` is solved by conjugate gradient on the subgraph
   (``trunclap.m``, ``dfs.m``).
3. **Pooling**: an image's score is the sum of its regions' scores weighted by its GMP
   weights (``accumarray(imids, f .* coeff)`` in ``run_test.m``), or the plain sum
   (``pool=sum``). The shortlist is ordered by it, ties by the global score.

The query's regions come from its image (computed as the database's were, a query box
cut out first), or from the cache for a query that is a stored image.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from deepfeat.errors import StoreError, UsageError
from deepfeat.rerank.base import Reranker, _check_shortlist, _query_rows
from deepfeat.rerank.diffusion import knn_graph, solve, system_matrix
from deepfeat.rerank.specs import RERANKERS, canonical_spec


def gmp_weights(R: np.ndarray, starts: np.ndarray, lam: float = 1.0) -> np.ndarray:
    """Generalized-max-pooling weights of every region (Murray & Perronnin, CVPR 2014): for
    the regions ``V`` (n x D) of one image, ``c = (V V^T + lam I)^-1 1``, so that ``V^T c``
    has the same similarity to every region of the image."""
    w = np.zeros(R.shape[0], np.float64)
    for i in range(len(starts) - 1):
        s, e = int(starts[i]), int(starts[i + 1])
        if e > s:
            V = R[s:e].astype(np.float64)
            w[s:e] = np.linalg.solve(V @ V.T + lam * np.eye(e - s), np.ones(e - s))
    return w


def seed_vector(S: np.ndarray, kq: int, gamma: float) -> np.ndarray:
    """``y`` from the similarities ``S`` (regions x query regions): each query region's ``kq``
    nearest regions, similarities summed per region, the ``kq`` largest sums to the power
    ``gamma`` (negative sums 0), zero elsewhere (the authors' ``ymake.m``)."""
    m, r = S.shape
    y = np.zeros(m, np.float64)
    if m == 0 or r == 0:
        return y
    kk = min(kq, m)
    top = np.argpartition(-S, kk - 1, axis=0)[:kk] if kk < m else np.broadcast_to(np.arange(m)[:, None], (m, r))
    acc = np.zeros(m, np.float64)
    np.add.at(acc, top.reshape(-1), np.take_along_axis(S, top, axis=0).reshape(-1).astype(np.float64))
    touched = np.unique(top)
    keep = touched[np.argsort(-acc[touched], kind="stable")[:kk]]
    y[keep] = np.power(np.maximum(acc[keep], 0.0), gamma)
    return y


class RegionalDiffusion(Reranker):
    """Diffusion on the graph of the database's image regions (see the module docstring).

    Give it the regional descriptors with :meth:`attach` (a regions section of the store, or
    ``(desc, counts)`` arrays: M x D unit vectors in feature-row order and the number of
    regions of each row); :class:`~deepfeat.search.SearchEngine` does this. ``rerank`` takes
    each query's regions as ``query_regions`` (an R x D array, or the row of a stored image
    whose cached regions are used)."""

    needs_regions = True

    def __init__(self, k: int = 200, kq: int = 200, alpha: float = 0.99, gamma: float = 3.0, trunc: int = 1000,
                 iters: int = 20, pool: str = "gmp", section: str = ""):
        super().__init__()
        if pool not in ("gmp", "sum"):
            raise UsageError(f"regional diffusion: pool must be gmp or sum, got {pool!r}")
        self.k, self.kq, self.alpha, self.gamma, self.trunc, self.iters = k, kq, alpha, gamma, trunc, iters
        self.pool = pool
        self.section = section or None
        self.spec = canonical_spec(RERANKERS["regional-diffusion"], {
            "k": k, "kq": kq, "alpha": alpha, "gamma": gamma, "trunc": trunc, "iters": iters, "pool": pool,
            "section": section})
        self._source: Any = None
        self.R: np.ndarray | None = None  # M x D regional descriptors of the database
        self.starts: np.ndarray | None = None  # row i's regions are R[starts[i]:starts[i + 1]]
        self.graph = None
        self.weights: np.ndarray | None = None
        self._full = None  # the system matrix of the whole graph, when a shortlist is the whole database
        self._sub_regions = 0

    def attach(self, source: Any) -> RegionalDiffusion:
        """The database's regional descriptors: a :class:`~deepfeat.localfeat.cache.LocalFeatureCache`
        of a regions section, or ``(desc, counts)``. The offline part is (re)built on first use."""
        self._source = source
        self._fitted_on = None
        return self

    def shortlist(self, n: int) -> int:
        return min(self.trunc, n)

    def _ensure_fit(self, xb: np.ndarray, index: Any = None) -> None:
        # the graph is over the regions, not xb: DBA or QE of the global vectors does not change it
        if self._fitted_on != (xb.shape[0],):
            t0 = time.perf_counter()
            import scipy.sparse.linalg  # noqa: F401  (its first import is an offline cost, not a query's)

            self.fit(xb, index)
            self.fit_seconds = time.perf_counter() - t0
            self._fitted_on = (xb.shape[0],)

    def fit(self, xb: np.ndarray, index: Any = None) -> RegionalDiffusion:
        from deepfeat.index import Index

        if self._source is None:
            raise UsageError("regional diffusion needs the database's regional descriptors: search through "
                             "SearchEngine (which reads the store's regions section) or call attach(...)")
        if hasattr(self._source, "all_descriptors"):
            R, counts = self._source.all_descriptors()
        else:
            R, counts = self._source
            R = np.ascontiguousarray(R, dtype=np.float32)
            counts = np.asarray(counts, dtype=np.int64)
        n = xb.shape[0]
        if len(counts) != n or int(counts.sum()) != R.shape[0]:
            where = getattr(getattr(self._source, "store", None), "path", "the store")
            raise StoreError(f"the regional descriptors cover {len(counts)} images ({R.shape[0]} regions), the "
                             f"database has {n}: compute them again with `deepfeat local-features {where} "
                             f"--extractor regions`")
        if R.shape[0] == 0:
            raise StoreError("the regional descriptors are empty: no image has a region")
        self.R, self.starts = R, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        index = Index.build(R, kind="auto", metric="ip", ids=np.arange(R.shape[0], dtype=np.int64))
        self.graph = knn_graph(R, self.k, self.gamma, index)
        self.weights = gmp_weights(R, self.starts) if self.pool == "gmp" else np.ones(R.shape[0])
        self._full = None
        return self

    def query_inputs(self, query_regions: Sequence[Any] | None, rows: Sequence[int | None] | None,
                     nq: int) -> dict[str, Any]:
        """Each query's regions: the array given, else its stored row (cached regions), else None."""
        given = list(query_regions) if query_regions is not None else [None] * nq
        if len(given) != nq:
            raise UsageError(f"query_regions must give one entry per query: {nq} queries, {len(given)} entries")
        rows = _query_rows(rows, nq)
        return {"query_regions": [g if g is not None else r for g, r in zip(given, rows)]}

    def _regions_of(self, qi: int, q: Any) -> np.ndarray:
        if q is None:
            raise UsageError(f"regional diffusion needs the regions of every query: query {qi} is neither a stored "
                             "image nor given with its image (vectors, e.g. .npy files, have no regions)")
        if isinstance(q, (int, np.integer)):
            return self.R[self.starts[q]: self.starts[q + 1]]
        q = np.asarray(q, dtype=np.float32)
        if q.ndim != 2 or (len(q) and q.shape[1] != self.R.shape[1]):
            raise UsageError(f"query {qi}: regional descriptors must be R x {self.R.shape[1]}, got {q.shape}")
        return q

    def rerank(self, xq: np.ndarray, xb: np.ndarray, I: np.ndarray, query_rows: Sequence[int | None] | None = None,
               index: Any = None, query_regions: Sequence[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        self._ensure_fit(xb, index)
        nq, n = xq.shape[0], xb.shape[0]
        I = _check_shortlist(I, nq, n)
        if query_regions is None:
            query_regions = self.query_inputs(None, query_rows, nq)["query_regions"]
        Q = [self._regions_of(qi, q) for qi, q in enumerate(query_regions)]
        t0 = time.perf_counter()
        R, starts, counts = self.R, self.starts, np.diff(self.starts)
        M = R.shape[0]
        L = I.shape[1]
        out_i = np.full((nq, L), -1, dtype=np.int64)
        out_s = np.full((nq, L), -np.inf, dtype=np.float32)
        for qi in range(nq):
            T = I[qi][I[qi] >= 0]
            if not len(T):
                continue
            s_glob = xb[T] @ xq[qi]
            if len(T) == n:  # the whole database: one system for every query
                if self._full is None:
                    self._full = system_matrix(self.graph, self.alpha)
                sub, system = None, self._full
                S = R @ Q[qi].T
            else:
                sub = np.concatenate([np.arange(starts[t], starts[t + 1]) for t in T])
                system = system_matrix(self.graph[sub][:, sub], self.alpha)
                S = R[sub] @ Q[qi].T if 4 * len(sub) < M else (R @ Q[qi].T)[sub]
            f = solve(system, seed_vector(S, self.kq, self.gamma), self.iters)
            if sub is None:
                per_row = np.bincount(np.repeat(np.arange(n), counts), weights=f * self.weights, minlength=n)
                score = per_row[T]
            else:
                score = np.bincount(np.repeat(np.arange(len(T)), counts[T]), weights=f * self.weights[sub],
                                    minlength=len(T))
            self._sub_regions += M if sub is None else len(sub)
            order = np.lexsort((-s_glob, -score))
            out_i[qi, : len(T)] = T[order]
            out_s[qi, : len(T)] = score[order]
        self.rerank_seconds += time.perf_counter() - t0
        self.queries += nq
        return out_i, out_s

    @property
    def stats(self) -> dict[str, Any]:
        d = super().stats
        d["regions"] = 0 if self.R is None else int(self.R.shape[0])
        d["regions_per_query"] = round(self._sub_regions / self.queries) if self.queries else None
        return d


__all__ = ["RegionalDiffusion", "gmp_weights", "seed_vector"]
