"""k-reciprocal re-ranking (Zhong, Zheng, Cao & Li, "Re-ranking person re-identification
with k-reciprocal encoding", CVPR 2017): :func:`k_reciprocal_distances` and the
:class:`KReciprocal` re-ranker."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from deepfeat.rerank.base import Reranker, _check_shortlist, _query_rows
from deepfeat.rerank.specs import RERANKERS, canonical_spec


def _reciprocal(rank: np.ndarray, k: int) -> list[np.ndarray]:
    """R(i, k) for every point: the j among i's k+1 nearest (i itself included) that have i among theirs."""
    fwd = rank[:, : k + 1]
    back = rank[fwd, : k + 1]  # M x (k+1) x (k+1)
    mutual = (back == np.arange(rank.shape[0])[:, None, None]).any(axis=2)
    return [fwd[i][mutual[i]] for i in range(rank.shape[0])]


def k_reciprocal_distances(X: np.ndarray, query_pos: Sequence[int], k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al.'s final distance ``d*`` from the points ``query_pos`` to every point of *X*.

    *X* (M x D) is the joint set (queries and database together); every step runs over all
    of it, as in the paper: ``d`` = squared Euclidean distance, each row divided by its
    maximum; ``R(p, k1)`` k-reciprocal sets (p's k1 + 1 nearest, p included, that have p
    among theirs); ``R*(p)`` = ``R(p, k1)`` united with every ``R(c, round(k1/2))``,
    c in ``R(p, k1)``, that has at least 2/3 of its elements in ``R(p, k1)``;
    ``V_p[g] = exp(-d(p, g))`` on ``R*(p)``, normalised to sum 1; local query expansion
    ``V_p <- mean of V over p's k2 nearest`` (p included); ``d_J(p, g) = 1 - sum min(V_p, V_g)
    / sum max(V_p, V_g)``; ``d* = (1 - lam) d_J + lam d``. Returns a len(query_pos) x M array.
    """
    from scipy import sparse

    X = np.asarray(X, dtype=np.float32)
    M = X.shape[0]
    sq = np.einsum("ij,ij->i", X, X)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (X @ X.T), 0.0)
    np.fill_diagonal(d, 0.0)
    dmax = d.max(axis=1, keepdims=True)
    np.divide(d, dmax, out=d, where=dmax > 0)
    k1 = min(k1, M - 1)
    half = int(np.around(k1 / 2))
    kk = min(max(k1, k2) + 1, M)
    part = np.argpartition(d, kk - 1, axis=1)[:, :kk] if kk < M else np.broadcast_to(np.arange(M), (M, M))
    pd = np.take_along_axis(d, part, axis=1)
    # nearest first; the point itself first among equals (its distance is 0), then lower index
    self_first = (part != np.arange(M)[:, None]).astype(np.int8)
    rank = np.take_along_axis(part, np.lexsort((part, self_first, pd), axis=1), axis=1)
    R = _reciprocal(rank, k1)
    Rh = _reciprocal(rank, half) if half >= 1 else [np.array([i]) for i in range(M)]
    rows, cols, vals = [], [], []
    for i in range(M):
        base = R[i]
        exp_set = [base]
        bset = set(base.tolist())
        for c in base:
            cand = Rh[c]
            if 3 * len(bset.intersection(cand.tolist())) >= 2 * len(cand):
                exp_set.append(cand)
        members = np.unique(np.concatenate(exp_set))
        w = np.exp(-d[i, members].astype(np.float64))
        rows.append(np.full(len(members), i))
        cols.append(members)
        vals.append(w / w.sum())
    V = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(M, M))
    if k2 > 1:
        k2 = min(k2, M)
        P = sparse.csr_matrix((np.full(M * k2, 1.0 / k2), (np.repeat(np.arange(M), k2), rank[:, :k2].reshape(-1))),
                              shape=(M, M))
        V = (P @ V).tocsr()
    Vc = V.tocsc()
    out = np.empty((len(query_pos), M), dtype=np.float64)
    for qi, p in enumerate(query_pos):
        vp = V.getrow(p)
        J, vj = vp.indices, vp.data
        mins = np.zeros(M)
        if len(J):
            block = Vc[:, J].toarray()  # M x |J|
            mins = np.minimum(block, vj[None, :]).sum(axis=1)
        # sum max = sum V_p + sum V_g - sum min, and every row sums to 1
        dj = 1.0 - mins / np.maximum(2.0 - mins, 1e-12)
        out[qi] = (1.0 - lam) * dj + lam * d[p]
    return out


class KReciprocal(Reranker):
    """k-reciprocal re-ranking (see the module docstring and :func:`k_reciprocal_distances`).

    Databases of at most ``trunc`` rows (or ``trunc=0``): one joint set of the database and
    every query that is not a database item (a stored query is its own database row, so it
    is not counted twice). Larger databases: per query, the query and its top-``trunc``
    global results; the rest keep their global order after them.
    """

    def __init__(self, k1: int = 20, k2: int = 6, lam: float = 0.3, trunc: int = 2000):
        super().__init__()
        self.k1, self.k2, self.lam, self.trunc = k1, k2, lam, trunc
        self.spec = canonical_spec(RERANKERS["kreciprocal"], {"k1": k1, "k2": k2, "lambda": lam, "trunc": trunc})

    def whole(self, n: int) -> bool:
        return self.trunc == 0 or n <= self.trunc

    def shortlist(self, n: int) -> int:
        return n if self.whole(n) else self.trunc

    def rerank(self, xq: np.ndarray, xb: np.ndarray, I: np.ndarray, query_rows: Sequence[int | None] | None = None,
               index: Any = None) -> tuple[np.ndarray, np.ndarray]:
        self._ensure_fit(xb, index)  # nothing to fit: every step depends on the queries
        nq, n = xq.shape[0], xb.shape[0]
        I = _check_shortlist(I, nq, n)
        rows = _query_rows(query_rows, nq)
        t0 = time.perf_counter()
        if self.whole(n):
            ext = [qi for qi in range(nq) if rows[qi] is None]
            X = np.concatenate([xb, xq[ext]]) if ext else xb
            pos = [rows[qi] if rows[qi] is not None else n + ext.index(qi) for qi in range(nq)]
            dist = k_reciprocal_distances(X, pos, self.k1, self.k2, self.lam)[:, :n]
            order = np.argsort(dist, axis=1, kind="stable")
            out_i = order.astype(np.int64)
            out_s = (1.0 - np.take_along_axis(dist, order, axis=1)).astype(np.float32)
        else:
            L = I.shape[1]  # the caller's shortlist (the engine asks for max(trunc, k))
            out_i = np.full((nq, L + 1), -1, dtype=np.int64)
            out_s = np.full((nq, L + 1), -np.inf, dtype=np.float32)
            for qi in range(nq):
                T = I[qi, :L]
                T = T[T >= 0]
                if rows[qi] is not None and rows[qi] not in T:
                    T = np.concatenate([[rows[qi]], T])
                if rows[qi] is not None:
                    X, p = xb[T], int(np.nonzero(T == rows[qi])[0][0])
                else:
                    X, p = np.concatenate([xb[T], xq[qi: qi + 1]]), len(T)
                dist = k_reciprocal_distances(X, [p], self.k1, self.k2, self.lam)[0, : len(T)]
                order = np.argsort(dist, kind="stable")
                out_i[qi, : len(T)] = T[order]
                out_s[qi, : len(T)] = 1.0 - dist[order]
        self.rerank_seconds += time.perf_counter() - t0
        self.queries += nq
        return out_i, out_s
