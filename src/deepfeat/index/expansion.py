"""Query expansion (AQE, alpha-QE) and database-side augmentation (DBA, alpha-DBA).

Pure numpy on N x D float32; each returns re-normalised copies. :func:`search_with_expansion`
shows the order they are applied in; :func:`dba_index` augments a database and rebuilds
its :class:`~deepfeat.index.Index`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.index.checks import _check_k, check_vectors
from deepfeat.index.exact import brute_force_search
from deepfeat.index.faiss_index import Index


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in place (zero rows stay zero) and return x."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _check_neighbours(I: Any, rows: int, n: int, nb: int, name: str = "I") -> np.ndarray:
    I = np.asarray(I)
    if I.ndim != 2 or I.shape[0] != rows:
        raise UsageError(f"{name} must be a {rows} x k array of neighbour row numbers, got shape {I.shape}")
    if I.dtype.kind not in "iu":
        raise UsageError(f"{name} must hold integer row numbers, got dtype {I.dtype}")
    if I.shape[1] < n:
        raise UsageError(f"{name} has {I.shape[1]} neighbours per row; expansion with n={n} needs at least {n}")
    top = I[:, :n]
    if top.size and int(top.max()) >= nb:
        raise UsageError(
            f"{name} holds row number {int(top.max())} but xb has {nb} rows: neighbour ids must be row numbers of xb"
        )
    return top.astype(np.int64, copy=False)


def _check_count(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise UsageError(f"{name} must be a non-negative integer, not {n!r}")
    return int(n)


def _check_alpha(alpha: Any) -> float:
    alpha = 0.0 if alpha is None else alpha
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.floating, np.integer))
        or not (math.isfinite(alpha) and alpha >= 0)
    ):
        raise UsageError(f"alpha must be a finite number >= 0, not {alpha!r}")
    return float(alpha)


def _expand(
    x: np.ndarray,
    xb: np.ndarray,
    nbrs: np.ndarray,
    alpha: float,
    sims: np.ndarray | None = None,
    block_rows: int = 65_536,
) -> np.ndarray:
    """normalise(x_i + sum_j w_ij xb[nbrs_ij]) with w_ij = max(sim_ij, 0)^alpha (1 when alpha = 0); nbrs < 0 skipped.

    sim_ij is ``sims`` if given, else the exact inner product x_i . xb[nbrs_ij].
    """
    out = np.empty_like(x)
    for s in range(0, x.shape[0], block_rows):
        xs = x[s : s + block_rows]
        acc = xs.copy()
        nb = nbrs[s : s + block_rows]
        for j in range(nb.shape[1]):
            col = nb[:, j]
            valid = col >= 0
            v = xb[np.where(valid, col, 0)]
            if alpha == 0.0:
                w = valid.astype(np.float32)
            else:
                sim = sims[s : s + block_rows, j] if sims is not None else np.einsum("ij,ij->i", xs, v)
                w = np.where(valid, np.power(np.maximum(sim, 0.0), alpha), 0.0).astype(np.float32)
            acc += w[:, None] * v
        out[s : s + block_rows] = acc
    return _normalize_rows(out)


def average_query_expansion(xq: np.ndarray, xb: np.ndarray, I: np.ndarray, n: int) -> np.ndarray:
    """Average query expansion (AQE; Chum, Philbin, Sivic, Isard & Zisserman, ICCV 2007).

    Each query becomes the mean of itself and its top *n* results, re-normalised:
    ``q' = normalise(q + sum_{j<n} xb[I[:, j]])``. *I* holds row numbers of *xb*
    (the store's row ids), best first; ``-1`` entries are skipped. Returns a new
    nq x D float32 array; ``n = 0`` returns the normalised queries.
    """
    return alpha_query_expansion(xq, xb, I, None, n, 0.0)


def alpha_query_expansion(
    xq: np.ndarray, xb: np.ndarray, I: np.ndarray, D: np.ndarray | None, n: int, alpha: float
) -> np.ndarray:
    """alpha-weighted query expansion (alpha-QE; Radenović, Tolias & Chum, TPAMI 2019).

    ``q' = normalise(q + sum_{j<n} max(s_j, 0)^alpha xb[I[:, j]])`` where s_j is the
    cosine similarity of q to its j-th neighbour: the query has weight 1 (= s(q, q)^alpha)
    and close neighbours count more as alpha grows; negative similarities count 0.
    ``alpha = 0`` gives every neighbour weight 1, i.e. :func:`average_query_expansion`.
    *D* are those similarities from an ``ip`` search (nq x >= n); pass ``None`` to compute
    them exactly from the vectors, as one must after an ``l2`` search or a compressed
    (ivfpq) one whose scores are approximate.
    """
    xq = check_vectors(xq, "xq")
    xb = check_vectors(xb, "xb", xq.shape[1])
    n = _check_count(n, "n")
    alpha = _check_alpha(alpha)
    nbrs = _check_neighbours(I, xq.shape[0], n, xb.shape[0])
    sims = None
    if D is not None and alpha != 0.0:
        D = np.asarray(D)
        if D.shape[0] != xq.shape[0] or D.ndim != 2 or D.shape[1] < n:
            raise UsageError(f"D must be a {xq.shape[0]} x >={n} array of similarities, got shape {D.shape}")
        sims = D[:, :n].astype(np.float32)
    return _expand(xq, xb, nbrs, alpha, sims)


def _without_self(I: np.ndarray, n: int) -> np.ndarray:
    """Each row's first n neighbours other than the row itself (a database row is its own nearest
    neighbour), -1 where a row has fewer."""
    I = np.asarray(I, dtype=np.int64)
    drop = (I == np.arange(I.shape[0])[:, None]) | (I < 0)
    order = np.argsort(drop, axis=1, kind="stable")  # kept neighbours first, in rank order
    out = np.where(np.take_along_axis(drop, order, axis=1), -1, np.take_along_axis(I, order, axis=1))
    return out[:, :n]


def database_side_augmentation(
    xb: np.ndarray,
    n: int,
    alpha: float | None = None,
    index_or_knn: Index | tuple[np.ndarray | None, np.ndarray] | np.ndarray | None = None,
) -> np.ndarray:
    """Database-side augmentation (DBA; Arandjelović & Zisserman, CVPR 2012), alpha-weighted as in Radenović et al.

    Each database vector is replaced by ``normalise(x + sum_{j<n} w_j nn_j(x))`` over its
    *n* nearest other database vectors, with ``w_j = max(x . nn_j, 0)^alpha`` (``alpha``
    None or 0: plain average, A&Z; alpha > 0: alpha-DBA). Queries searched against the
    augmented database should be expanded with the same n and alpha (see
    :func:`search_with_expansion`). Neighbours come from *index_or_knn*: an :class:`Index`
    over *xb* with row numbers as ids (searched with k = n + 1), a precomputed ``(D, I)``
    pair or ``I`` array of each row's neighbours (self may be included: it is dropped),
    or None for exact numpy search (O(N^2 d): use an index beyond ~10^5 rows).
    """
    xb = check_vectors(xb, "xb")
    n = _check_count(n, "n")
    alpha = _check_alpha(alpha)
    N = xb.shape[0]
    if n == 0:
        return _normalize_rows(xb.copy())
    if index_or_knn is None:
        _, I = brute_force_search(xb, xb, min(n + 1, N), "ip")
    elif isinstance(index_or_knn, Index):
        if index_or_knn.ntotal != N:
            raise UsageError(f"the index holds {index_or_knn.ntotal} vectors but xb has {N} rows")
        _, I = index_or_knn.search(xb, min(n + 1, N))
    elif isinstance(index_or_knn, tuple):
        if len(index_or_knn) != 2:
            raise UsageError("index_or_knn as a tuple must be (D, I)")
        I = index_or_knn[1]
    else:
        I = index_or_knn
    I = np.asarray(I)
    n_used = min(n, N - 1)  # a row has at most N - 1 other rows
    if I.ndim != 2 or I.shape[0] != N or I.dtype.kind not in "iu":
        raise UsageError(f"the neighbour lists must be an integer {N} x k array, got {I.dtype} {I.shape}")
    if I.shape[1] < n_used:
        raise UsageError(f"DBA with n={n} needs at least {n_used} neighbours per row, got {I.shape[1]}")
    nbrs = _check_neighbours(_without_self(I, n_used), N, n_used, N)
    return _expand(xb, xb, nbrs, alpha)


def dba_index(index: Index, xb: np.ndarray, n: int, alpha: float | None = None) -> tuple[Index, np.ndarray]:
    """Augment the database (:func:`database_side_augmentation`, neighbours from *index*) and
    index the augmented vectors with the same kind and parameters (:meth:`Index.rebuilt`).

    Returns ``(augmented index, augmented xb)``; the index meta records
    ``augmentation = {"method": "dba", "n": n, "alpha": alpha}``. Do this once and save the
    result: it searches every database vector and rebuilds the index.
    """
    xb = check_vectors(xb, "xb", index.d)
    if index.ntotal != xb.shape[0]:
        raise UsageError(f"the index holds {index.ntotal} vectors but xb has {xb.shape[0]} rows")
    alpha = _check_alpha(alpha)
    xb_aug = database_side_augmentation(xb, n, alpha, index)
    augmented = index.rebuilt(xb_aug)
    augmented._meta["augmentation"] = {"method": "dba", "n": int(n), "alpha": alpha}
    return augmented, xb_aug


def search_with_expansion(
    index: Index, xq: np.ndarray, xb: np.ndarray, k: int, qe: int = 0, alpha: float = 0.0, dba: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Search with DBA and query expansion, in that order; returns ``(D, I)`` like :meth:`Index.search`.

    1. ``dba > 0``: every database vector is augmented with its *dba* neighbours and a
       temporary index of the same kind and parameters is built over the result
       (:func:`dba_index`; IVF quantizers are reused, flat/HNSW rebuilt), so an
       approximate index stays approximate and an exact one exact;
    2. first search of the (original) queries for their top *qe*;
    3. ``qe > 0``: alpha-QE over the (augmented) database vectors, weights sim^alpha
       (alpha = 0: AQE);
    4. second search of the expanded queries for the top *k*.

    The same alpha weights DBA and QE, and QE averages the same (augmented) vectors the
    index holds, so queries and database go through the same transformation. *xb* is
    the database the index was built from, with row numbers as ids. DBA costs a search
    of the whole database and a rebuild: for repeated searches call :func:`dba_index`
    once and pass its results here with ``dba=0``.
    """
    xq = check_vectors(xq, "xq", index.d)
    xb = check_vectors(xb, "xb", index.d)
    k = _check_k(k)
    qe = _check_count(qe, "qe")
    dba = _check_count(dba, "dba")
    alpha = _check_alpha(alpha)
    if index.ntotal != xb.shape[0]:
        raise UsageError(f"the index holds {index.ntotal} vectors but xb has {xb.shape[0]} rows")
    if dba:
        index, xb = dba_index(index, xb, dba, alpha)
    if not qe:
        return index.search(xq, k)
    _, I0 = index.search(xq, qe)
    xq_expanded = alpha_query_expansion(xq, xb, I0, None, qe, alpha)
    return index.search(xq_expanded, k)
