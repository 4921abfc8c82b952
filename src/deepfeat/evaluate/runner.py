"""Scoring a ground truth: rankings by similarity, then every query's ranking scored
by its protocol's metrics and averaged (mAP, mP@k, the UKBench N-S score)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.evaluate.metrics import _ap_oxford, _ap_revisited, _check_k, _precision_oxford, _precision_revisited
from deepfeat.evaluate.values import EvalResult, GroundTruth, Query, QueryResult


def _check_ranks(ranks: np.ndarray, gt: GroundTruth) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim == 1 and len(gt.queries) == 1:
        ranks = ranks[None, :]
    if ranks.ndim != 2 or ranks.shape[0] != len(gt.queries):
        raise UsageError(f"ranks must be a [queries, N] array with one row per query ({len(gt.queries)} "
                         f"queries in the {gt.protocol} ground truth), got shape {ranks.shape}")
    if ranks.size and ranks.dtype.kind not in "iu":
        raise UsageError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    if ranks.size and ranks.max() >= gt.n_db:
        raise UsageError(f"ranks hold database index {int(ranks.max())} but the ground truth was resolved "
                         f"against {gt.n_db} database items; rank the same store the ground truth was built for")
    return ranks


def _per_query(ranks: np.ndarray, gt: GroundTruth) -> Iterator[tuple[Query, np.ndarray, np.ndarray, int]]:
    """For each query: (query, is_pos, is_junk, number of relevant items) over its ranking.

    Negative entries (FAISS pads with -1), ``gt.excluded`` and, with
    ``gt.exclude_query``, the query's own item are removed from the ranking first.
    """
    ranks = _check_ranks(ranks, gt)
    removed = np.zeros(gt.n_db, dtype=bool)
    if gt.excluded:
        removed[np.fromiter(gt.excluded, dtype=np.int64, count=len(gt.excluded))] = True
    rel_mask = np.zeros(gt.n_db, dtype=bool)
    junk_mask = np.zeros(gt.n_db, dtype=bool)
    for q, row in zip(gt.queries, ranks):
        row = row[row >= 0]
        keep = ~removed[row]
        rel = set(q.relevant)
        if gt.exclude_query and q.index is not None:
            keep &= row != q.index
            rel.discard(q.index)
        row = row[keep]
        rel_idx = np.fromiter(rel, dtype=np.int64, count=len(rel))
        junk_idx = np.fromiter(q.junk, dtype=np.int64, count=len(q.junk))
        rel_mask[rel_idx] = True
        junk_mask[junk_idx] = True
        is_pos, is_junk = rel_mask[row], junk_mask[row]
        rel_mask[rel_idx] = False
        junk_mask[junk_idx] = False
        yield q, is_pos, is_junk, len(rel)


def evaluate_ranks(ranks: np.ndarray, gt: GroundTruth, ks: Sequence[int] = (1, 5, 10)) -> EvalResult:
    """Score a ``[Q, N]`` array of database indices (best first, one row per query).

    Rows may be truncated (top-k search) and padded with -1; unranked relevant items
    count as never retrieved. AP and P@k follow the ground truth's protocol: Philbin's
    definitions, or Radenovic's for ``revisited-*``. For UKBench the N-S score is
    added. Means leave out queries without relevant items.
    """
    ks = tuple(_check_k(k) for k in ks)
    ap_fn, p_fn = (_ap_revisited, _precision_revisited) if gt.revisited else (_ap_oxford, _precision_oxford)
    ukbench = gt.protocol == "ukbench"
    rows: list[QueryResult] = []
    for q, is_pos, is_junk, npos in _per_query(ranks, gt):
        nonjunk = is_pos[~is_junk]
        hits = np.flatnonzero(nonjunk)
        if npos:
            precision = {k: p_fn(is_pos, is_junk, k) for k in ks}
        else:
            precision = {k: float("nan") for k in ks}
        rows.append(QueryResult(
            name=q.name, ap=ap_fn(is_pos, is_junk, npos), precision=precision, n_relevant=npos,
            n_junk=len(q.junk), first_hit=int(hits[0]) + 1 if hits.size else None,
            top4_hits=int(np.count_nonzero(nonjunk[:4])) if ukbench else None,
        ))
    scored = [r for r in rows if r.n_relevant > 0]
    mean = (lambda xs: float(np.mean(xs))) if scored else (lambda xs: float("nan"))
    return EvalResult(
        protocol=gt.protocol, ks=ks, map=mean([r.ap for r in scored]),
        mp_at_k={k: mean([r.precision[k] for r in scored]) for k in ks}, queries=tuple(rows),
        n_skipped=len(rows) - len(scored),
        ns_score=float(np.mean([r.top4_hits for r in rows])) if ukbench and rows else None,
        source=gt.source,
    )


def mean_average_precision(ranks: np.ndarray, gt: GroundTruth) -> float:
    """mAP of a ``[Q, N]`` ranking over the queries that have relevant items."""
    return evaluate_ranks(ranks, gt, ks=()).map


def ns_score(ranks: np.ndarray, gt: GroundTruth, k: int = 4) -> float:
    """UKBench N-S score (Nister & Stewenius 2006): the mean number of relevant items
    among the first *k* = 4 of each ranking, 4.0 at best. With :func:`ukbench_gt` the
    query itself is one of its group's 4 images and is counted."""
    k = _check_k(k)
    counts = [np.count_nonzero(is_pos[~is_junk][:k]) for _, is_pos, is_junk, _ in _per_query(ranks, gt)]
    return float(np.mean(counts)) if counts else float("nan")


def _as_matrix(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise UsageError(f"{name} must be an N x D array of features, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise UsageError(f"{name} has {rows.size} row(s) with NaN or infinite values (rows "
                         f"{', '.join(map(str, rows[:5]))}{', ...' if rows.size > 5 else ''})")
    return x


def rank_by_similarity(xq: np.ndarray, xb: np.ndarray, exclude_self: Any = None, k: int | None = None) -> np.ndarray:
    """Brute-force ranking by inner product: ``[Q, N]`` int64 database indices, best first.

    *xq* (Q x D) and *xb* (N x D) are float32 features (L2-normalised features give
    cosine similarity). Ties keep database order (a stable sort). *exclude_self*
    removes one item per query from its row, which is then padded with -1 at the
    end: ``True`` when query i is database item i, or a sequence of Q database
    indices (-1 for none), such as ``gt.query_indices()``. *k* keeps the first k
    columns only.
    """
    xq, xb = _as_matrix(xq, "xq"), _as_matrix(xb, "xb")
    nq, nb = xq.shape[0], xb.shape[0]
    if xq.shape[1] != xb.shape[1]:
        raise UsageError(f"query and database features differ in dimension: {xq.shape[1]} vs {xb.shape[1]}")
    if exclude_self is None or exclude_self is False:
        self_idx = None
    elif exclude_self is True:
        if nq != nb:
            raise UsageError(f"exclude_self=True means query i is database item i, but there are {nq} queries "
                             f"and {nb} database items; pass the query indices instead")
        self_idx = np.arange(nq, dtype=np.int64)
    else:
        self_idx = np.asarray(exclude_self, dtype=np.int64).reshape(-1)
        if self_idx.shape[0] != nq or (self_idx.size and (self_idx.min() < -1 or self_idx.max() >= nb)):
            raise UsageError(f"exclude_self must hold one database index (or -1) per query: {nq} values "
                             f"in [-1, {nb}), got {self_idx.shape[0]} values")
    width = nb if k is None else min(_check_k(k), nb)
    out = np.full((nq, width), -1, dtype=np.int64)
    step = max(1, (1 << 22) // max(nb, 1))  # bound the Q x N score block to ~16 MB
    for s in range(0, nq, step):
        scores = xq[s:s + step] @ xb.T
        order = np.argsort(-scores, axis=1, kind="stable")
        if self_idx is not None:
            drop = order == self_idx[s:s + step, None]
            # move the dropped entry to the end (stable), then blank it
            order = np.take_along_axis(order, np.argsort(drop, axis=1, kind="stable"), axis=1)
            order[drop.any(axis=1), -1] = -1
        out[s:s + step] = order[:, :width]
    return out
