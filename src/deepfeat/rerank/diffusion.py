"""Diffusion re-ranking (Iscen, Tolias, Avrithis, Furon & Chum, "Efficient diffusion on
region manifolds", CVPR 2017) on one global vector per image: the mutual k-NN graph of
the database (:func:`knn_graph`), the normalised system ``I - alpha S``
(:func:`system_matrix`) and its conjugate-gradient solve (:func:`diffuse`)."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from deepfeat.rerank.base import Reranker, _check_shortlist
from deepfeat.rerank.specs import RERANKERS, canonical_spec


def knn_graph(xb: np.ndarray, k: int, gamma: float, index: Any = None):
    """The mutual k-NN affinity graph of the database (scipy CSR, N x N, zero diagonal).

    ``W_ij = max(0, x_i . x_j)^gamma`` for j among the k nearest other rows of i, then
    ``A = min(W, W^T)``: an edge survives only where each end is among the other's k
    nearest (Iscen et al. 2017, Sec. 3). Neighbours come from *index* (an
    :class:`~deepfeat.index.Index` over *xb* with row ids) or exact numpy search; the
    similarities of an approximate index are recomputed exactly, so it only affects who is a neighbour.
    """
    from scipy import sparse

    from deepfeat.index import brute_force_search, check_vectors

    xb = check_vectors(xb, "xb")
    n = xb.shape[0]
    kk = min(k, n - 1)
    if kk < 1:
        return sparse.csr_matrix((n, n), dtype=np.float64)
    if index is not None:
        D, I = index.search(xb, kk + 1)
        exact = index.exact and index.metric == "ip"
    else:
        D, I = brute_force_search(xb, xb, kk + 1, "ip")
        exact = True
    I = np.asarray(I, dtype=np.int64)
    if not exact:  # approximate or l2 scores: the exact inner products, a block of rows at a time
        D = np.empty(I.shape, dtype=np.float32)
        for b in range(0, n, 256):
            D[b: b + 256] = np.einsum("ij,ikj->ik", xb[b: b + 256], xb[np.maximum(I[b: b + 256], 0)])
    rows = np.repeat(np.arange(n), I.shape[1])
    cols = I.reshape(-1)
    keep = (cols >= 0) & (cols != rows)
    rows, cols = rows[keep], cols[keep]
    s = np.asarray(D, dtype=np.float64).reshape(-1)[keep]
    w = np.power(np.maximum(s, 0.0), gamma)
    W = sparse.csr_matrix((w, (rows, cols)), shape=(n, n))
    A = W.minimum(W.T).tocsr()
    A.eliminate_zeros()
    return A


def system_matrix(A, alpha: float):
    """``I - alpha D^-1/2 A D^-1/2`` (CSR); rows of isolated nodes are those of I."""
    from scipy import sparse

    deg = np.asarray(A.sum(axis=1)).reshape(-1)
    dinv = np.zeros_like(deg)
    np.divide(1.0, np.sqrt(deg), out=dinv, where=deg > 0)
    Dm = sparse.diags(dinv)
    return (sparse.identity(A.shape[0], format="csr") - alpha * (Dm @ A @ Dm)).tocsr()


def diffuse(A_sub, y: np.ndarray, alpha: float, iters: int, tol: float = 1e-6) -> np.ndarray:
    """Solve ``(I - alpha S) f = y`` with ``S = D^-1/2 A D^-1/2`` by conjugate gradient.

    ``I - alpha S`` is symmetric positive definite for 0 < alpha < 1 (the eigenvalues of S
    lie in [-1, 1]), so CG applies; isolated nodes (degree 0) keep ``f = y``.
    """
    return solve(system_matrix(A_sub, alpha), y, iters, tol)


def solve(L, y: np.ndarray, iters: int, tol: float = 1e-6) -> np.ndarray:
    """Conjugate gradient on a system matrix of :func:`system_matrix`, started from *y*
    (at most *iters* iterations; a zero *y* gives zero)."""
    from scipy.sparse.linalg import cg

    if not np.any(y):
        return y.copy()
    f, _ = cg(L, y, x0=y.copy(), rtol=tol, maxiter=iters)
    return f


class Diffusion(Reranker):
    """Diffusion re-ranking (see the module docstring); ``spec`` records every parameter."""

    def __init__(self, k: int = 50, kq: int = 10, alpha: float = 0.9, gamma: float = 3.0, trunc: int = 1000,
                 iters: int = 20):
        super().__init__()
        self.k, self.kq, self.alpha, self.gamma, self.trunc, self.iters = k, kq, alpha, gamma, trunc, iters
        self.spec = canonical_spec(RERANKERS["diffusion"], {"k": k, "kq": kq, "alpha": alpha, "gamma": gamma,
                                                            "trunc": trunc, "iters": iters})
        self.graph = None
        self._solver = None

    def shortlist(self, n: int) -> int:
        return min(self.trunc, n)

    def fit(self, xb: np.ndarray, index: Any = None) -> Diffusion:
        self.graph = knn_graph(xb, self.k, self.gamma, index)
        self._solver = None
        return self

    def _whole_solver(self):
        """When the shortlist is the whole database, the truncated system is the same for every
        query: factorise ``I - alpha S`` once (sparse LU) and solve it exactly per query."""
        if self._solver is None:
            from scipy import sparse
            from scipy.sparse.linalg import factorized

            self._solver = factorized(sparse.csc_matrix(system_matrix(self.graph, self.alpha)))
        return self._solver

    def rerank(self, xq: np.ndarray, xb: np.ndarray, I: np.ndarray, query_rows: Sequence[int | None] | None = None,
               index: Any = None) -> tuple[np.ndarray, np.ndarray]:
        self._ensure_fit(xb, index)
        I = _check_shortlist(I, xq.shape[0], xb.shape[0])
        t0 = time.perf_counter()
        A = self.graph
        n = xb.shape[0]
        L = I.shape[1]  # the caller's shortlist (the engine asks for max(trunc, k))
        out_i = np.full((xq.shape[0], L), -1, dtype=np.int64)
        out_s = np.full((xq.shape[0], L), -np.inf, dtype=np.float32)
        whole = L >= n and (I >= 0).all()  # every shortlist is the whole database: one system for all
        for qi in range(xq.shape[0]):
            T = I[qi, :L]
            T = T[T >= 0]
            if not len(T):
                continue
            s = xb[T] @ xq[qi]
            seeds = np.argsort(-s, kind="stable")[: self.kq]
            y = np.zeros(len(T))
            y[seeds] = np.power(np.maximum(s[seeds].astype(np.float64), 0.0), self.gamma)
            if whole:
                yf = np.zeros(n)
                yf[T] = y
                f = self._whole_solver()(yf)[T]
            else:
                f = diffuse(A[T][:, T], y, self.alpha, self.iters)
            order = np.lexsort((-s, -f))
            out_i[qi, : len(T)] = T[order]
            out_s[qi, : len(T)] = f[order]
        self.rerank_seconds += time.perf_counter() - t0
        self.queries += xq.shape[0]
        return out_i, out_s
