"""Re-ranking of the global shortlist: diffusion and k-reciprocal nearest neighbours.

Both take what the global search found (each query's shortlist of database rows, best
first) and re-order it using the structure of the database itself:

* ``diffusion`` (Iscen, Tolias, Avrithis, Furon & Chum, "Efficient diffusion on region
  manifolds", CVPR 2017). Offline: the mutual k-NN graph of the database (neighbours from
  the project's FAISS :class:`~deepfeat.index.Index`), affinities ``max(0, s)^gamma``.
  Per query: the subgraph of its top-``trunc`` global results, symmetrically normalised
  ``S = D^-1/2 A D^-1/2``, and ``(I - alpha S) f = y`` solved by conjugate gradient, where
  ``y`` holds the query's ``kq`` nearest similarities ``^gamma``. Results are ordered by
  ``f`` (then by the global score for nodes diffusion does not reach).
* ``kreciprocal`` (Zhong, Zheng, Cao & Li, "Re-ranking person re-identification with
  k-reciprocal encoding", CVPR 2017). Over the joint set queries + database (or, for a
  database larger than ``trunc``, each query + its top-``trunc`` shortlist):
  k-reciprocal sets ``R(p, k1)``, expanded by the ``R(c, round(k1/2))`` of their members
  that share at least 2/3 of their elements with it, Gaussian-kernel weights
  ``exp(-d)`` over the expanded set (rows summing to 1), local query expansion (mean of
  the vectors of the ``k2`` nearest), Jaccard distance, and
  ``d* = (1 - lambda) d_J + lambda d``.

Specs follow the pooling/index grammar: ``diffusion``, ``diffusion:k=50,alpha=0.99``,
``kreciprocal:k1=20,k2=6,lambda=0.3``; :func:`get_reranker` parses them and names the
valid choices on a mistake. Everything here is numpy/scipy on N x D float32 arrays whose
inner products are cosine similarities (the store's post-processing normalises).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .errors import UsageError, suggest

# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class RerankParam:
    """One parameter of a re-ranking spec."""

    name: str
    kind: type  # int or float
    default: Any
    rule: str  # what valid values are, for error messages
    check: Callable[[Any], bool]
    doc: str


@dataclass(frozen=True)
class RerankKind:
    name: str
    summary: str
    citation: str
    params: tuple[RerankParam, ...]

    @property
    def syntax(self) -> str:
        return self.name + ":" + ",".join(f"{p.name}={p.default}" for p in self.params)


_INT_GE1 = ("an integer >= 1", lambda v: v >= 1)
_INT_GE0 = ("an integer >= 0", lambda v: v >= 0)

RERANKERS: dict[str, RerankKind] = {
    k.name: k
    for k in (
        RerankKind(
            "diffusion", "diffusion on the mutual k-NN graph of the database, CG solve on the query's shortlist",
            "Iscen, Tolias, Avrithis, Furon & Chum, Efficient diffusion on region manifolds, CVPR 2017",
            (RerankParam("k", int, 50, *_INT_GE1, "neighbours per database item in the offline graph"),
             RerankParam("kq", int, 10, *_INT_GE1, "query neighbours that seed the diffusion (y)"),
             RerankParam("alpha", float, 0.9, "a number in (0, 1)", lambda v: 0 < v < 1, "diffusion weight"),
             RerankParam("gamma", float, 3.0, "a number > 0", lambda v: v > 0, "affinity power max(0,s)^gamma"),
             RerankParam("trunc", int, 1000, *_INT_GE1, "shortlist size: the subgraph diffusion runs on"),
             RerankParam("iters", int, 20, *_INT_GE1, "conjugate-gradient iterations at most"))),
        RerankKind(
            "kreciprocal", "k-reciprocal encoding: expanded reciprocal sets, Jaccard distance blended with the original",
            "Zhong, Zheng, Cao & Li, Re-ranking person re-identification with k-reciprocal encoding, CVPR 2017",
            (RerankParam("k1", int, 20, *_INT_GE1, "size of the k-reciprocal neighbourhoods"),
             RerankParam("k2", int, 6, *_INT_GE1, "neighbours averaged by local query expansion (1: none)"),
             RerankParam("lambda", float, 0.3, "a number in [0, 1]", lambda v: 0 <= v <= 1,
                         "weight of the original distance"),
             RerankParam("trunc", int, 2000, *_INT_GE0,
                         "databases larger than this re-rank each query's top-trunc only (0: always all)"))),
    )
}


def list_rerankers() -> list[str]:
    return list(RERANKERS)


def _parse_value(kind: RerankKind, p: RerankParam, text: str) -> Any:
    bad = UsageError(f"re-ranking {kind.name!r}: {p.name} must be {p.rule}, got {text!r}")
    try:
        f = float(text)
    except ValueError:
        raise bad from None
    if not math.isfinite(f) or (p.kind is int and not f.is_integer()):
        raise bad
    v = int(f) if p.kind is int else f
    if not p.check(v):
        raise bad
    return v


def parse_rerank_spec(spec: str) -> tuple[RerankKind, dict[str, Any]]:
    """``name[:k=v,...]`` -> (kind, full parameter dict). Raises :class:`UsageError` listing the choices."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty re-ranking spec; valid: {', '.join(RERANKERS)}")
    name, sep, argstr = spec.strip().partition(":")
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in RERANKERS:
        raise UsageError(f"unknown re-ranking {name.strip()!r}; valid: {', '.join(RERANKERS)} "
                         f"(e.g. {RERANKERS['diffusion'].syntax}).{suggest(key, RERANKERS)}")
    kind = RERANKERS[key]
    params = {p.name: p.default for p in kind.params}
    by_name = {p.name.lower(): p for p in kind.params}
    if sep:
        for arg in argstr.split(","):
            k, eq, v = arg.partition("=")
            if not eq or not k.strip() or not v.strip():
                raise UsageError(f"re-ranking spec {spec!r}: write parameters as name=value, e.g. {kind.syntax}")
            p = by_name.get(k.strip().lower())
            if p is None:
                raise UsageError(f"re-ranking {kind.name!r} has no parameter {k.strip()!r}; its parameters are: "
                                 f"{', '.join(q.name for q in kind.params)}{suggest(k.strip(), by_name)}")
            params[p.name] = _parse_value(kind, p, v.strip())
    return kind, params


def canonical_spec(kind: RerankKind, params: dict[str, Any]) -> str:
    """The spec with every parameter written out (what results and meta record)."""
    return kind.name + ":" + ",".join(f"{p.name}={params[p.name]:g}" if p.kind is float else
                                      f"{p.name}={params[p.name]}" for p in kind.params)


def get_reranker(spec: str | Reranker) -> Reranker:
    """Parse a spec into a :class:`Diffusion` or :class:`KReciprocal` (a reranker passes through)."""
    if isinstance(spec, Reranker):
        return spec
    kind, params = parse_rerank_spec(spec)
    if kind.name == "diffusion":
        return Diffusion(**params)
    return KReciprocal(k1=params["k1"], k2=params["k2"], lam=params["lambda"], trunc=params["trunc"])


def describe_rerankers() -> list[dict[str, str]]:
    return [{"name": k.name, "syntax": k.syntax, "summary": k.summary, "citation": k.citation,
             "params": "; ".join(f"{p.name} ({p.default}): {p.doc}" for p in k.params)} for k in RERANKERS.values()]


# --------------------------------------------------------------------------- common


def _check_shortlist(I: np.ndarray, nq: int, n: int) -> np.ndarray:
    I = np.asarray(I)
    if I.ndim != 2 or I.shape[0] != nq or I.dtype.kind not in "iu":
        raise UsageError(f"the shortlist must be an integer {nq} x L array of database rows, got {I.dtype} {I.shape}")
    if I.size and I.max() >= n:
        raise UsageError(f"the shortlist holds row {int(I.max())} but the database has {n} rows")
    return I


def _query_rows(query_rows: Sequence[int | None] | None, nq: int) -> list[int | None]:
    if query_rows is None:
        return [None] * nq
    rows = [None if r is None or r < 0 else int(r) for r in query_rows]
    if len(rows) != nq:
        raise UsageError(f"query_rows must give one row (or None) per query: {nq} queries, {len(rows)} rows")
    return rows


class Reranker:
    """Base: ``fit`` the database once (cached), then ``rerank`` shortlists.

    ``rerank(xq, xb, I, query_rows)`` takes Q x D queries, the N x D database, each
    query's global shortlist ``I`` (Q x L rows, best first, -1 padded) and, for queries
    that are database items, their rows. It returns ``(I', scores)``: each query's
    re-ranked rows (Q x L', best first, -1 padded) and their scores (higher is better).
    ``shortlist(n)`` is how many global results it wants. ``stats`` reports the cost.
    """

    spec: str = ""

    def __init__(self) -> None:
        self.fit_seconds = 0.0
        self.rerank_seconds = 0.0
        self.queries = 0
        self._fitted_on: tuple[int, int] | None = None

    def shortlist(self, n: int) -> int:
        raise NotImplementedError

    def fit(self, xb: np.ndarray, index: Any = None) -> Reranker:
        return self

    def _ensure_fit(self, xb: np.ndarray, index: Any = None) -> None:
        key = (id(xb), xb.shape[0])
        if self._fitted_on != key:
            t0 = time.perf_counter()
            import scipy.sparse.linalg  # noqa: F401  (its first import is an offline cost, not a query's)

            self.fit(xb, index)
            self.fit_seconds = time.perf_counter() - t0
            self._fitted_on = key

    @property
    def stats(self) -> dict[str, Any]:
        return {"rerank": self.spec, "offline_seconds": round(self.fit_seconds, 4),
                "ms_per_query": round(1000 * self.rerank_seconds / self.queries, 3) if self.queries else None,
                "queries": self.queries}


def complete_ranking(head: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Each row of *head* (re-ranked rows, -1 padded) followed by the rows of *full* it lacks, in order."""
    out = np.full((head.shape[0], full.shape[1]), -1, dtype=np.int64)
    for qi in range(head.shape[0]):
        h = head[qi][head[qi] >= 0]
        f = full[qi][full[qi] >= 0]
        rest = f[~np.isin(f, h)]
        row = np.concatenate([h, rest])[: full.shape[1]]
        out[qi, : len(row)] = row
    return out


def rerank_ranks(reranker: Reranker, xq: np.ndarray, xb: np.ndarray, ranks: np.ndarray,
                 query_rows: Sequence[int | None] | None = None, index: Any = None) -> np.ndarray:
    """Full rankings (Q x N, as :func:`deepfeat.evaluate.rank_by_similarity` gives) with each
    query's shortlist re-ranked by *reranker*; the rest keeps its global order."""
    head, _ = reranker.rerank(xq, xb, np.ascontiguousarray(ranks[:, : reranker.shortlist(xb.shape[0])]),
                              query_rows, index=index)
    return complete_ranking(head, ranks)


# --------------------------------------------------------------------------- diffusion


def knn_graph(xb: np.ndarray, k: int, gamma: float, index: Any = None):
    """The mutual k-NN affinity graph of the database (scipy CSR, N x N, zero diagonal).

    ``W_ij = max(0, x_i . x_j)^gamma`` for j among the k nearest other rows of i, then
    ``A = min(W, W^T)``: an edge survives only where each end is among the other's k
    nearest (Iscen et al. 2017, Sec. 3). Neighbours come from *index* (an
    :class:`~deepfeat.index.Index` over *xb* with row ids) or exact numpy search; the
    similarities of an approximate index are recomputed exactly, so it only affects who is a neighbour.
    """
    from scipy import sparse

    from .index import brute_force_search, check_vectors

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
    from scipy.sparse.linalg import cg

    L = system_matrix(A_sub, alpha)
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


# --------------------------------------------------------------------------- k-reciprocal


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


__all__ = ["RERANKERS", "Reranker", "Diffusion", "KReciprocal", "get_reranker", "parse_rerank_spec",
           "list_rerankers", "describe_rerankers", "knn_graph", "diffuse", "k_reciprocal_distances",
           "complete_ranking", "rerank_ranks"]
