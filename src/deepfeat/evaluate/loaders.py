"""Retrieval evaluation: ground truth loaders and pure-numpy metrics.

Ground truth (:class:`GroundTruth`) is a list of :class:`Query` values whose relevant
and junk items are *database indices* (rows of a feature store), resolved once from
the names the ground-truth files use. Metrics take a ranking, either one list of ids
(:func:`average_precision`, :func:`precision_at_k`, ...) or a ``[Q, N]`` array of
database indices sorted by decreasing similarity (:func:`evaluate_ranks`).

Two AP definitions are implemented, each reproducing its reference program:

* :func:`average_precision`: Philbin et al.'s ``compute_ap.cpp`` for Oxford 5k /
  Paris 6k (CVPR 2007): junk items are skipped, positives are good + ok, and AP is
  the trapezoidal area under the precision-recall curve, accumulated in single
  precision exactly as the C++ program does, so the printed value matches it digit
  for digit.
* :func:`average_precision_revisited`: Radenovic et al.'s ``compute_ap`` /
  ``compute_map`` for the revisited ROxford / RParis easy, medium and hard protocols
  (CVPR 2018), in double precision, with its own mP@k definition.

Ties: metrics see only the order they are given; ties in similarity are resolved by
whoever produced the ranking. :func:`rank_by_similarity` sorts stably, so items with
equal scores keep database order (lower index first).

See docs/evaluation.md for the protocols, the formulas and the file formats.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, UsageError, suggest

__all__ = [
    "REVISITED_FORMAT",
    "REVISITED_PROTOCOLS",
    "EvalResult",
    "GroundTruth",
    "Query",
    "QueryResult",
    "average_precision",
    "average_precision_revisited",
    "class_folder_gt",
    "evaluate_ranks",
    "groups_gt",
    "load_oxford_gt",
    "load_revisited_gt",
    "mean_average_precision",
    "ns_score",
    "parse_gt_spec",
    "precision_at_k",
    "precision_at_k_revisited",
    "rank_by_similarity",
    "read_gt_lists",
    "read_name_list",
    "read_revisited_gnd",
    "recall_at_k",
    "ukbench_gt",
]

#: Value of the ``format`` field of a revisited ground-truth JSON file.
REVISITED_FORMAT = "deepfeat-revisited-gnd"
#: Revisited protocols: (positives, junk) as lists of the gnd keys they are made of.
REVISITED_PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
_OXFORD_QUERY_PREFIX = "oxc1_"  # the Oxford release prefixes query image names with it


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Query:
    """One query of a ground truth.

    ``image`` is the query image as the ground truth names it; ``index`` and ``path``
    locate it in the database (``None`` when the database does not hold it, as in the
    revisited protocols where query images are not database images). ``bbox`` is the
    query region ``(x1, y1, x2, y2)`` in pixels of the original image, or ``None`` for
    whole-image queries. ``relevant`` and ``junk`` are database indices.
    """

    name: str
    image: str
    index: int | None
    path: str | None
    relevant: frozenset[int]
    junk: frozenset[int] = frozenset()
    bbox: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class GroundTruth:
    """Queries with their relevant and junk database items, and how to rank them.

    ``exclude_query``: each query's own database item is removed from its ranking
    before scoring (class-folder and group protocols, where every database image is
    also a query); it is never among its own relevant items.
    ``excluded``: database items removed from every ranking (the revisited protocols'
    query images, when the store also holds them: the revisited database does not).
    ``protocol`` selects the AP and P@k definitions: names starting with
    ``revisited`` use Radenovic's, all others Philbin's.
    """

    protocol: str
    queries: tuple[Query, ...]
    n_db: int
    exclude_query: bool = False
    excluded: frozenset[int] = frozenset()
    source: str = ""

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def revisited(self) -> bool:
        return self.protocol.startswith("revisited")

    def query_indices(self) -> np.ndarray:
        """Database index of each query image, -1 where the database does not hold it."""
        return np.array([-1 if q.index is None else q.index for q in self.queries], dtype=np.int64)


@dataclass(frozen=True)
class QueryResult:
    """The scores of one query; precisions keyed by k. Fractions in [0, 1]."""

    name: str
    ap: float
    precision: dict[int, float]
    n_relevant: int
    n_junk: int
    first_hit: int | None  # 1-based rank of the first relevant item, junk not counted
    top4_hits: int | None = None  # UKBench only: relevant items among the first 4

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "ap": _json_float(self.ap),
            "precision": {str(k): _json_float(v) for k, v in self.precision.items()},
            "n_relevant": self.n_relevant,
            "n_junk": self.n_junk,
            "first_hit": self.first_hit,
        }
        if self.top4_hits is not None:
            d["top4_hits"] = self.top4_hits
        return d


@dataclass(frozen=True)
class EvalResult:
    """mAP, mP@k (and the N-S score for UKBench) with the per-query rows they average.

    Queries without any relevant item get AP and P@k ``nan`` and are left out of the
    means (as Radenovic's ``compute_map`` does); ``n_skipped`` counts them.
    """

    protocol: str
    ks: tuple[int, ...]
    map: float
    mp_at_k: dict[int, float]
    queries: tuple[QueryResult, ...]
    n_skipped: int = 0
    ns_score: float | None = None
    source: str = ""

    @property
    def n_queries(self) -> int:
        return len(self.queries)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``nan`` becomes ``null``)."""
        d: dict[str, Any] = {
            "protocol": self.protocol,
            "source": self.source,
            "ap_definition": "revisited" if self.protocol.startswith("revisited") else "oxford",
            "map": _json_float(self.map),
            "mp_at_k": {str(k): _json_float(v) for k, v in self.mp_at_k.items()},
            "n_queries": self.n_queries,
            "n_skipped": self.n_skipped,
        }
        if self.ns_score is not None:
            d["ns_score"] = _json_float(self.ns_score)
        d["queries"] = [q.to_dict() for q in self.queries]
        return d

    def summary(self) -> str:
        """One line: ``protocol: mAP 61.23  mP@1 ... (55 queries)``, percentages."""
        parts = [f"{self.protocol}: mAP {_pct(self.map)}"]
        parts += [f"mP@{k} {_pct(v)}" for k, v in self.mp_at_k.items()]
        if self.ns_score is not None:
            parts.append(f"N-S {self.ns_score:.3f}")
        tail = f"({self.n_queries} queries"
        tail += f", {self.n_skipped} without relevant items skipped)" if self.n_skipped else ")"
        return "  ".join(parts) + "  " + tail

    def table(self) -> str:
        """The per-query table (AP and P@k in percent) followed by the summary line."""
        headers = ["query", "AP", *(f"P@{k}" for k in self.ks), "relevant", "junk", "first hit"]
        ukb = any(q.top4_hits is not None for q in self.queries)
        if ukb:
            headers.append("top-4 hits")
        rows = []
        for q in self.queries:
            row = [q.name, _pct(q.ap), *(_pct(q.precision[k]) for k in self.ks), q.n_relevant, q.n_junk,
                   "-" if q.first_hit is None else q.first_hit]
            if ukb:
                row.append("-" if q.top4_hits is None else q.top4_hits)
            rows.append(row)
        return _text_table(rows, headers, "l" + "r" * (len(headers) - 1)) + "\n" + self.summary()


def _json_float(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:.2f}"


def _text_table(rows: list[list[Any]], headers: list[str], align: str) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)).rstrip()

    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


# ------------------------------------------------------------ metrics, one ranking


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


# ------------------------------------------------------- metrics, many rankings


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


# ---------------------------------------------------------- matching names to rows


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


class _NameIndex:
    """Finds database items by the names ground-truth files use.

    A name matches a database path when it is that path, or when it has the same file
    name or the same stem (Oxford names have no extension); a name with folders
    (``daffodil/image_0001.jpg``) must also match the path's last folders.
    """

    def __init__(self, db_paths: Sequence[str | os.PathLike]):
        self.paths = [os.fspath(p) for p in db_paths]
        if not self.paths:
            raise UsageError("the database is empty: no item paths to match the ground truth against")
        self._exact: dict[str, int] = {}
        self._by_name: dict[str, list[int]] = {}
        self._by_stem: dict[str, list[int]] = {}
        self._parts: list[list[str]] = []
        for i, p in enumerate(self.paths):
            self._exact.setdefault(p, i)
            parts = _split_path(p)
            self._parts.append(parts)
            base = parts[-1] if parts else p
            self._by_name.setdefault(base, []).append(i)
            self._by_stem.setdefault(_stem(base), []).append(i)

    def candidates(self, name: str) -> list[int]:
        if name in self._exact:
            return [self._exact[name]]
        parts = _split_path(name)
        if not parts:
            return []
        base = parts[-1]
        cands = self._by_name.get(base) or self._by_stem.get(base) or self._by_stem.get(_stem(base)) or []
        if len(parts) > 1:
            dirs = parts[:-1]
            cands = [i for i in cands if self._parts[i][:-1][-len(dirs):] == dirs]
        return cands

    def resolve(self, names: Iterable[str], what: str, fallbacks: dict[str, str] | None = None) -> dict[str, int]:
        """Map every name to one database index, or raise listing the missing/ambiguous."""
        found: dict[str, int] = {}
        missing: list[str] = []
        ambiguous: list[str] = []
        for name in dict.fromkeys(names):
            cands = self.candidates(name)
            if not cands and fallbacks and name in fallbacks:
                cands = self.candidates(fallbacks[name])
            if len(cands) == 1:
                found[name] = cands[0]
            elif cands:
                ambiguous.append(f"{name} ({', '.join(self.paths[i] for i in cands[:3])})")
            else:
                missing.append(name)
        total = len(found) + len(missing) + len(ambiguous)
        if missing:
            raise UsageError(
                f"{len(missing)} of the {total} images named in {what} are not in the database of "
                f"{len(self.paths)} items (e.g. {', '.join(missing[:5])}); names are matched to database "
                f"paths by file name or stem. Use a store built from the full image set this ground truth "
                f"describes (database e.g. {self.paths[0]})")
        if ambiguous:
            raise UsageError(
                f"{len(ambiguous)} images named in {what} match several database items by name: "
                f"{'; '.join(ambiguous[:3])}; give paths with their folders to tell them apart")
        return found


def _split_path(p: str) -> list[str]:
    return [x for x in p.strip().replace("\\", "/").split("/") if x not in ("", ".")]


def read_name_list(path: str | os.PathLike, what: str = "list file") -> list[str]:
    """Non-blank lines of a text file of names, surrounding whitespace (and CR) removed."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    return [s for s in (line.strip() for line in text.splitlines()) if s]


def read_gt_lists(prefix: str | os.PathLike) -> tuple[set[str], set[str]]:
    """Positives (good + ok) and junk names of one Oxford/Paris query, given its prefix
    (``gt_files_170407/all_souls_1`` reads ``all_souls_1_good.txt``, ``_ok.txt``, ``_junk.txt``)."""
    prefix = os.fspath(prefix)
    lists = {}
    for kind in ("good", "ok", "junk"):
        path = Path(prefix + f"_{kind}.txt")
        if not path.is_file():
            m = re.search(r"_(good|ok|junk|query)(\.txt)?$", prefix)
            hint = f"; give the prefix without the suffix, e.g. {prefix[:m.start()]}" if m else ""
            raise UsageError(f"ground-truth file not found: {path} (GT_PREFIX names the query, the "
                             f"program reads GT_PREFIX_good.txt, _ok.txt and _junk.txt){hint}")
        lists[kind] = read_name_list(path)
    return set(lists["good"]) | set(lists["ok"]), set(lists["junk"])


# ------------------------------------------------------------------------ loaders


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _parse_oxford_query(path: Path) -> tuple[str, tuple[float, float, float, float]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise FormatError(f"{path}: empty query file; expected one line 'IMAGE x1 y1 x2 y2'")
    lineno, line = lines[0]
    tokens = line.split()
    try:
        if len(tokens) != 5:
            raise ValueError
        x1, y1, x2, y2 = (float(t) for t in tokens[1:])
    except ValueError:
        raise FormatError(f"{path}:{lineno}: expected 'IMAGE x1 y1 x2 y2' (e.g. 'oxc1_all_souls_000013 136.5 "
                          f"34.1 648.5 955.7'), got {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        raise FormatError(f"{path}:{lineno}: the query box must have x1 < x2 and y1 < y2, got {line.strip()!r}")
    return tokens[0], (x1, y1, x2, y2)


def load_oxford_gt(gt_dir: str | os.PathLike, db_paths: Sequence[str]) -> GroundTruth:
    """Oxford 5k / Paris 6k ground truth from a ``gt_files`` folder.

    Each query has ``<name>_query.txt`` (``oxc1_<image> x1 y1 x2 y2``; the ``oxc1_``
    prefix is dropped) and ``_good.txt``, ``_ok.txt``, ``_junk.txt`` lists. Relevant =
    good + ok, junk ignored. The query image is a database image, is listed as good,
    and stays in its own ranking (the standard protocol; its region is what is
    queried). Queries are in natural order of their names.
    """
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise UsageError(f"Oxford/Paris ground-truth folder not found: {gt_dir}")
    query_files = sorted(gt_dir.glob("*_query.txt"), key=lambda p: _natural_key(p.name))
    if not query_files:
        raise UsageError(f"no *_query.txt files in {gt_dir}; expected an Oxford/Paris gt_files folder with "
                         f"<landmark>_<n>_query.txt, _good.txt, _ok.txt and _junk.txt per query")
    raw = []
    for qf in query_files:
        name = qf.name[: -len("_query.txt")]
        image, bbox = _parse_oxford_query(qf)
        try:
            positives, junk = read_gt_lists(gt_dir / name)
        except UsageError as e:
            raise FormatError(f"incomplete ground truth for query {name} in {gt_dir}: {e}") from None
        raw.append((name, image, bbox, positives, junk))
    index = _NameIndex(db_paths)
    fallbacks = {im: im[len(_OXFORD_QUERY_PREFIX):] for _, im, *_ in raw if im.startswith(_OXFORD_QUERY_PREFIX)}
    names = [n for _, im, _, pos, jk in raw for n in (im, *sorted(pos), *sorted(jk))]
    found = _resolve_oxford(index, names, fallbacks, f"the ground truth {gt_dir}")
    queries = tuple(
        Query(name=name, image=fallbacks.get(image, image), index=found[image], path=index.paths[found[image]],
              relevant=frozenset(found[n] for n in pos), junk=frozenset(found[n] for n in jk), bbox=bbox)
        for name, image, bbox, pos, jk in raw
    )
    return GroundTruth("oxford", queries, len(index.paths), exclude_query=False, source=str(gt_dir))


def _resolve_oxford(index: _NameIndex, names: list[str], fallbacks: dict[str, str], what: str) -> dict[str, int]:
    # Query names carry 'oxc1_'; prefer the name without it, keep the full name as a fallback.
    preferred = {n: fallbacks.get(n, n) for n in names}
    back = {v: k for k, v in fallbacks.items()}
    found = index.resolve(preferred.values(), what, fallbacks=back)
    return {n: found[p] for n, p in preferred.items()}


def class_folder_gt(db_paths: Sequence[str]) -> GroundTruth:
    """Every image is a query; relevant = the other images in the same parent folder.

    The query itself is removed from its ranking (``exclude_query``), as is standard
    for class-folder retrieval benchmarks (e.g. Oxford Flowers 17: mAP and P@10).
    A query alone in its folder has no relevant item and is left out of the means.
    """
    paths = [os.fspath(p) for p in db_paths]
    if not paths:
        raise UsageError("the database is empty: no item paths to take class folders from")
    folders: dict[str, list[int]] = {}
    parts = [_split_path(p) for p in paths]
    for i, pp in enumerate(parts):
        folders.setdefault("/".join(pp[:-1]), []).append(i)
    if len(folders) < 2:
        raise UsageError(f"class-folder ground truth needs images in at least two class folders, but all "
                         f"{len(paths)} database images are in {next(iter(folders)) or 'one folder'!r}; "
                         f"use groups:FILE.csv to give classes explicitly")
    members = {f: frozenset(ix) for f, ix in folders.items()}
    queries = []
    for i, pp in enumerate(parts):
        folder = "/".join(pp[:-1])
        queries.append(Query(name="/".join(pp[-2:]), image=paths[i], index=i, path=paths[i],
                             relevant=members[folder] - {i}))
    return GroundTruth("folders", tuple(queries), len(paths), exclude_query=True, source="folders")


def groups_gt(csv_path: str | os.PathLike, db_paths: Sequence[str], exclude_query: bool = True) -> GroundTruth:
    """Groups from a CSV file of ``path,group`` rows (an optional ``path,group`` header).

    Every listed image is a query; relevant = the other images of its group. Paths
    are matched to the database by path, file name or stem (with folders when given);
    database images not listed are distractors. With *exclude_query* (default) the
    query is removed from its ranking; otherwise it stays and counts as relevant.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UsageError(f"groups file not found: {csv_path}")
    rows: dict[str, str] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if lineno == 1 and [c.strip().lower() for c in row] == ["path", "group"]:
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise FormatError(f"{csv_path}:{lineno}: expected 'path,group', got {','.join(row)!r} "
                                      f"(quote paths that contain commas)")
                path, group = row[0].strip(), row[1].strip()
                if rows.get(path, group) != group:
                    raise FormatError(f"{csv_path}:{lineno}: {path} is listed in two groups, "
                                      f"{rows[path]!r} and {group!r}")
                rows[path] = group
    except UnicodeDecodeError as e:
        raise FormatError(f"{csv_path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise FormatError(f"{csv_path}: {e}") from None
    if not rows:
        raise FormatError(f"{csv_path}: no 'path,group' rows")
    index = _NameIndex(db_paths)
    found = index.resolve(rows, f"the groups file {csv_path}")
    if len(set(found.values())) != len(found):
        seen: dict[int, str] = {}
        for name, i in found.items():
            if i in seen:
                raise FormatError(f"{csv_path}: {seen[i]!r} and {name!r} both name database item {index.paths[i]}")
            seen[i] = name
    by_group: dict[str, set[int]] = {}
    for name, group in rows.items():
        by_group.setdefault(group, set()).add(found[name])
    members = {g: frozenset(ix) for g, ix in by_group.items()}
    queries = tuple(
        Query(name=name, image=name, index=found[name], path=index.paths[found[name]],
              relevant=members[group] - {found[name]} if exclude_query else members[group])
        for name, group in rows.items()
    )
    return GroundTruth("groups", queries, len(index.paths), exclude_query=exclude_query, source=str(csv_path))


def ukbench_gt(db_paths: Sequence[str]) -> GroundTruth:
    """UKBench (Nister & Stewenius 2006): ``ukbenchNNNNN.jpg``, group = NNNNN // 4.

    Every image is a query and stays in its own ranking: relevant = the whole group
    including the query, so a perfect ranking scores N-S 4.0 and AP 1.
    """
    paths = [os.fspath(p) for p in db_paths]
    if not paths:
        raise UsageError("the database is empty: no UKBench images")
    numbers: list[int] = []
    bad: list[str] = []
    for p in paths:
        m = re.search(r"(\d+)$", _stem(os.path.basename(p.replace("\\", "/"))))
        if m:
            numbers.append(int(m.group(1)))
        else:
            bad.append(p)
    if bad:
        raise UsageError(f"{len(bad)} of {len(paths)} database images have no UKBench number in their name "
                         f"(e.g. {', '.join(bad[:3])}); expected names like ukbench00012.jpg (group = 12 // 4)")
    if len(set(numbers)) != len(numbers):
        dup = sorted({n for n in numbers if numbers.count(n) > 1})[:3]
        raise UsageError(f"several database images share a UKBench number (e.g. {dup}); one image per number")
    groups: dict[int, set[int]] = {}
    for i, n in enumerate(numbers):
        groups.setdefault(n // 4, set()).add(i)
    members = {g: frozenset(ix) for g, ix in groups.items()}
    queries = tuple(
        Query(name=_stem(os.path.basename(p.replace("\\", "/"))), image=p, index=i, path=p,
              relevant=members[n // 4])
        for i, (p, n) in enumerate(zip(paths, numbers))
    )
    return GroundTruth("ukbench", queries, len(paths), exclude_query=False, source="ukbench")


def read_revisited_gnd(json_path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a revisited ground-truth JSON file (see docs/evaluation.md).

    ``{"format": "deepfeat-revisited-gnd", "version": 1, "imlist": [names],
    "qimlist": [names], "gnd": [{"bbx": [x1, y1, x2, y2] | null, "easy": [i],
    "hard": [i], "junk": [i]}, ...]}``, indices 0-based into ``imlist``, one gnd
    entry per query. ``scripts/convert_revisited_gnd.py`` writes it from the official
    ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``; a ``.pkl`` path is read directly, with
    the restricted unpickler of :mod:`deepfeat.gnd_pickle` (no code runs; anything but
    numpy arrays, lists, dicts, numbers and strings is refused).
    """
    path = Path(json_path)
    if not path.is_file():
        raise UsageError(f"revisited ground-truth file not found: {path}")
    if path.suffix.lower() == ".pkl":  # the official file, read by an unpickler that runs no code
        from ..gnd_pickle import read_revisited_pickle

        data = read_revisited_pickle(path)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: not valid JSON ({e})") from None

    def bad(msg: str) -> FormatError:
        return FormatError(f"{path}: {msg} (expected the {REVISITED_FORMAT} JSON written by "
                           f"scripts/convert_revisited_gnd.py)")

    if not isinstance(data, dict):
        raise bad("the top level is not an object")
    if data.get("format", REVISITED_FORMAT) != REVISITED_FORMAT:
        raise bad(f"format is {data.get('format')!r}")
    if data.get("version", 1) != 1:
        raise bad(f"unsupported version {data.get('version')!r}; this deepfeat reads version 1")
    for key in ("imlist", "qimlist", "gnd"):
        if not isinstance(data.get(key), list):
            raise bad(f"{key!r} is missing or not a list")
    for key in ("imlist", "qimlist"):
        if not all(isinstance(s, str) and s for s in data[key]):
            raise bad(f"{key!r} must hold image names (non-empty strings)")
    nq, nim = len(data["qimlist"]), len(data["imlist"])
    if len(data["gnd"]) != nq:
        raise bad(f"'gnd' has {len(data['gnd'])} entries for {nq} query images in 'qimlist'")
    for qi, g in enumerate(data["gnd"]):
        if not isinstance(g, dict):
            raise bad(f"gnd[{qi}] is not an object")
        for key in ("easy", "hard", "junk"):
            v = g.get(key)
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                raise bad(f"gnd[{qi}][{key!r}] must be a list of integer indices into 'imlist'")
            out = [i for i in v if not 0 <= i < nim]
            if out:
                raise bad(f"gnd[{qi}][{key!r}] has indices outside 'imlist' (0..{nim - 1}): {out[:3]}")
        bbx = g.get("bbx")
        if bbx is not None and (not isinstance(bbx, list) or len(bbx) != 4
                                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbx)):
            raise bad(f"gnd[{qi}]['bbx'] must be [x1, y1, x2, y2] or null")
    return data


def load_revisited_gt(json_path: str | os.PathLike, db_paths: Sequence[str], protocol: str) -> GroundTruth:
    """ROxford / RParis ground truth (Radenovic et al. 2018) for one protocol.

    *protocol* is ``easy`` (relevant easy; junk junk + hard), ``medium`` (easy + hard;
    junk) or ``hard`` (hard; junk + easy). Every ``imlist`` image must be in the
    database; query images (``qimlist``) are not part of the revisited database, so
    when the store holds them (a store of the original 5063 / 6392 images) they are
    removed from every ranking (``excluded``). Extra database images (R1M
    distractors) are kept.
    """
    return _revisited_gts(json_path, db_paths, [protocol])[0]


def _revisited_gts(json_path: str | os.PathLike, db_paths: Sequence[str], protocols: list[str]) -> list[GroundTruth]:
    for protocol in protocols:
        if protocol not in REVISITED_PROTOCOLS:
            raise UsageError(f"unknown revisited protocol {protocol!r}; choose one of "
                             f"{', '.join(REVISITED_PROTOCOLS)}.{suggest(protocol, REVISITED_PROTOCOLS)}")
    data = read_revisited_gnd(json_path)
    index = _NameIndex(db_paths)
    im_idx = index.resolve(data["imlist"], f"'imlist' of {json_path}")
    db_of = [im_idx[n] for n in data["imlist"]]
    if len(set(db_of)) != len(db_of):
        raise UsageError(f"'imlist' of {json_path} names some database items twice; check the store's paths")
    in_imlist = set(db_of)
    located = []
    for qname in data["qimlist"]:
        cands = index.candidates(qname)
        located.append(cands[0] if len(cands) == 1 else None)
    excluded = frozenset(i for i in located if i is not None and i not in in_imlist)
    out = []
    for protocol in protocols:
        pos_keys, junk_keys = REVISITED_PROTOCOLS[protocol]
        queries = tuple(
            Query(name=qname, image=qname, index=qindex, path=None if qindex is None else index.paths[qindex],
                  relevant=frozenset(db_of[i] for key in pos_keys for i in g[key]),
                  junk=frozenset(db_of[i] for key in junk_keys for i in g[key]),
                  bbox=None if g.get("bbx") is None else tuple(float(v) for v in g["bbx"]))
            for qname, qindex, g in zip(data["qimlist"], located, data["gnd"])
        )
        out.append(GroundTruth(f"revisited-{protocol}", queries, len(index.paths), exclude_query=False,
                               excluded=excluded, source=str(json_path)))
    return out


_SPEC_FORMS = ("folders", "ukbench", "groups:FILE.csv", "oxford:GT_DIR", "revisited:GND.json",
               "revisited-easy:GND.json", "revisited-medium:GND.json", "revisited-hard:GND.json")


def parse_gt_spec(spec: str, db_paths: Sequence[str]) -> list[GroundTruth]:
    """Ground truth from a ``--gt`` SPEC, resolved against the store's item paths.

    ``folders``, ``ukbench``, ``groups:FILE.csv``, ``oxford:GT_DIR`` (Oxford or
    Paris), ``revisited:GND.json`` (three ground truths: easy, medium, hard) or
    ``revisited-<protocol>:GND.json`` (one). Returns a list, one per protocol.
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("folders", "ukbench"):
        if arg:
            raise UsageError(f"--gt {kind} takes no argument, got {spec!r}")
        return [class_folder_gt(db_paths) if kind == "folders" else ukbench_gt(db_paths)]
    needs_arg = {"groups": "FILE.csv", "oxford": "GT_DIR", "revisited": "GND.json",
                 **{f"revisited-{p}": "GND.json" for p in REVISITED_PROTOCOLS}}
    if kind not in needs_arg:
        raise UsageError(f"unknown ground-truth spec {spec!r}; valid forms: {', '.join(_SPEC_FORMS)}."
                         f"{suggest(kind, [*needs_arg, 'folders', 'ukbench'])}")
    if not arg:
        raise UsageError(f"--gt {kind} needs a file or folder: {kind}:{needs_arg[kind]}")
    if kind == "groups":
        return [groups_gt(arg, db_paths)]
    if kind == "oxford":
        return [load_oxford_gt(arg, db_paths)]
    protocols = list(REVISITED_PROTOCOLS) if kind == "revisited" else [kind.split("-", 1)[1]]
    return _revisited_gts(arg, db_paths, protocols)
