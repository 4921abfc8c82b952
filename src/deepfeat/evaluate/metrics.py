"""Metrics of one ranking, pure numpy: AP (Philbin's and Radenovic's definitions),
P@k (both definitions) and recall@k, on any hashable ids."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from deepfeat.errors import UsageError


def _flags(ranked_ids: Iterable[Any], positives: Iterable[Any], junk: Iterable[Any]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-rank booleans (is positive, is junk) and the number of distinct positives."""
    pos, jk = set(positives), set(junk)
    ranked = ranked_ids.tolist() if isinstance(ranked_ids, np.ndarray) else list(ranked_ids)
    is_pos = np.fromiter((x in pos for x in ranked), dtype=bool, count=len(ranked))
    is_junk = np.fromiter((x in jk for x in ranked), dtype=bool, count=len(ranked))
    return is_pos, is_junk, len(pos)


def _ap_oxford(is_pos: np.ndarray, is_junk: np.ndarray, npos: int) -> float:
    """Philbin's compute_ap on per-rank flags, float32 arithmetic as in the C++ source.

    Per non-junk rank j (0-based) the program computes, in this order and these types::

        recall    = (float) intersect / (float) npos          # float32
        precision = (float) (intersect / (j + 1.0))           # double -> float32
        ap       += (recall - old_recall) * ((old_precision + precision) / 2.0)

    where ``recall - old_recall`` and ``old_precision + precision`` are float32
    operations, the product is double, and ``ap`` (a float) is rounded after each
    addition. Only ranks holding a positive change ``ap`` (elsewhere the recall step is
    exactly 0), so the terms are computed vectorised and summed in rank order.
    """
    if npos == 0:
        return float("nan")
    j = np.flatnonzero(is_pos[~is_junk])  # 0-based non-junk ranks of the positives
    if j.size == 0:
        return 0.0
    n = np.arange(1, j.size + 1, dtype=np.float64)  # positives seen, including this one
    recall = n.astype(np.float32) / np.float32(npos)
    old_recall = np.concatenate([np.zeros(1, np.float32), recall[:-1]])
    precision = (n / (j + 1.0)).astype(np.float32)
    old_precision = np.where(j == 0, np.float32(1.0), ((n - 1.0) / np.maximum(j, 1)).astype(np.float32))
    terms = (recall - old_recall).astype(np.float64) * ((old_precision + precision).astype(np.float64) / 2.0)
    ap = np.float32(0.0)
    for t in terms.tolist():
        ap = np.float32(float(ap) + t)
    return float(ap)


def _revisited_positions(is_pos: np.ndarray, is_junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives once the junk ranked before each is discounted."""
    pos = np.flatnonzero(is_pos)
    junk = np.flatnonzero(is_junk)
    return pos - np.searchsorted(junk, pos, side="left")


def _ap_revisited(is_pos: np.ndarray, is_junk: np.ndarray, npos: int) -> float:
    """Radenovic's compute_ap (revisitop / cirtorch ``evaluate.py``), float64."""
    if npos == 0:
        return float("nan")
    rank = _revisited_positions(is_pos, is_junk)
    if rank.size == 0:
        return 0.0
    j = np.arange(rank.size, dtype=np.float64)
    precision_0 = np.where(rank == 0, 1.0, j / np.maximum(rank, 1))
    precision_1 = (j + 1.0) / (rank + 1.0)
    terms = (precision_0 + precision_1) * (1.0 / npos) / 2.0
    return float(np.cumsum(terms)[-1])  # cumsum adds in order, like the reference loop


def _precision_oxford(is_pos: np.ndarray, is_junk: np.ndarray, k: int) -> float:
    return float(np.count_nonzero(is_pos[~is_junk][:k])) / k


def _precision_revisited(is_pos: np.ndarray, is_junk: np.ndarray, k: int) -> float:
    rank1 = _revisited_positions(is_pos, is_junk) + 1
    if rank1.size == 0:
        return 0.0
    kq = min(int(rank1.max()), k)
    return float(np.count_nonzero(rank1 <= kq)) / kq


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"k must be a positive integer, got {k!r}")
    return int(k)


def average_precision(ranked_ids: Sequence[Any], positives: Iterable[Any], junk: Iterable[Any] = ()) -> float:
    """AP as Philbin's ``compute_ap`` program computes it (Oxford 5k / Paris 6k).

    *ranked_ids* is the ranking, best first (any hashable ids: db indices or image
    names). Items in *junk* are skipped as if absent (junk wins over positive); the
    area is the sum over positive ranks of ``(1/P) * (p_prev + p_here) / 2``, P the
    number of distinct *positives* (including those never ranked), p the precision
    at the non-junk ranks, ``p_prev = 1`` before the first rank. Returns ``nan``
    when there are no positives (the program prints ``-nan``).
    """
    return _ap_oxford(*_flags(ranked_ids, positives, junk))


def average_precision_revisited(ranked_ids: Sequence[Any], positives: Iterable[Any],
                                junk: Iterable[Any] = ()) -> float:
    """AP as Radenovic's ``compute_map`` computes it for ROxford / RParis.

    Equal to :func:`average_precision` up to float rounding when positives and junk
    are disjoint; it is computed in double precision, and an item listed both as
    positive and as junk counts as a positive. ``nan`` when there are no positives.
    """
    return _ap_revisited(*_flags(ranked_ids, positives, junk))


def precision_at_k(ranked_ids: Sequence[Any], positives: Iterable[Any], k: int, junk: Iterable[Any] = ()) -> float:
    """Positives among the first *k* non-junk items, divided by *k*."""
    is_pos, is_junk, _ = _flags(ranked_ids, positives, junk)
    return _precision_oxford(is_pos, is_junk, _check_k(k))


def precision_at_k_revisited(ranked_ids: Sequence[Any], positives: Iterable[Any], k: int,
                             junk: Iterable[Any] = ()) -> float:
    """The revisited protocol's P@k: with junk removed, ``k' = min(k, rank of the last
    ranked positive)`` and P@k = positives within the first k' / k' (Radenovic's
    ``compute_map``; it differs from :func:`precision_at_k` when all ranked positives
    come before rank k). 0 when no positive is ranked."""
    is_pos, is_junk, _ = _flags(ranked_ids, positives, junk)
    return _precision_revisited(is_pos, is_junk, _check_k(k))


def recall_at_k(ranked_ids: Sequence[Any], positives: Iterable[Any], k: int, junk: Iterable[Any] = ()) -> float:
    """Fraction of the positives among the first *k* non-junk items (``nan`` if none)."""
    is_pos, is_junk, npos = _flags(ranked_ids, positives, junk)
    if npos == 0:
        return float("nan")
    return float(np.count_nonzero(is_pos[~is_junk][: _check_k(k)])) / npos
