"""What every re-ranker shares: the :class:`Reranker` base (a cached offline ``fit``,
per-query ``rerank`` of a shortlist, its cost), the shortlist checks, and full rankings
with a re-ranked head (:func:`complete_ranking`, :func:`rerank_ranks`)."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from deepfeat.errors import UsageError


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

    def query_inputs(self, query_regions: Sequence[Any] | None, rows: Sequence[int | None] | None,
                     nq: int) -> dict[str, Any]:
        """Keyword arguments of :meth:`rerank` beyond the vectors, from what the caller knows of
        each query: regional descriptors and stored rows (see :class:`RegionalDiffusion`). None here."""
        return {}

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
                 query_rows: Sequence[int | None] | None = None, index: Any = None, **inputs: Any) -> np.ndarray:
    """Full rankings (Q x N, as :func:`deepfeat.evaluate.rank_by_similarity` gives) with each
    query's shortlist re-ranked by *reranker*; the rest keeps its global order. *inputs*: the
    re-ranker's own (:meth:`Reranker.query_inputs`)."""
    head, _ = reranker.rerank(xq, xb, np.ascontiguousarray(ranks[:, : reranker.shortlist(xb.shape[0])]),
                              query_rows, index=index, **inputs)
    return complete_ranking(head, ranks)
