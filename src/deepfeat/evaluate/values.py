"""The values evaluation passes around: a ground truth (:class:`Query`,
:class:`GroundTruth`) and its scores (:class:`QueryResult`, :class:`EvalResult`,
with their JSON and text tables)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


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
