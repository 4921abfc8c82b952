"""One ``deepfeat search`` as a library call: :class:`SearchRequest` (query strings, top-k,
:class:`~deepfeat.search.options.SearchOptions`, a region, spatial verification) answered by
:func:`answer` with a :class:`SearchResponse` (labels, rows, hits, and what each step cost)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from deepfeat.errors import UsageError
from deepfeat.search.engine import SearchEngine
from deepfeat.search.hits import Hit
from deepfeat.search.options import SearchOptions


@dataclass
class SearchRequest:
    """*queries*: image files, stored paths/ids or ``.npy`` files; *bbox*: a region cut out of
    image queries; *verify*: ``VerifyParams`` (the top N re-ordered by spatial verification with
    the local-feature section *local*)."""

    queries: Sequence[str]
    top: int = 10
    options: SearchOptions = field(default_factory=SearchOptions)
    bbox: tuple[float, float, float, float] | None = None
    verify: Any = None
    local: str | None = None


@dataclass
class VerifyCost:
    """Spatial verification: the local-feature section used, milliseconds per query for the
    query's local features and for matching + RANSAC."""

    spec: str
    local_ms: float
    verify_ms: float


@dataclass
class SearchResponse:
    """Per query: its label, store row (None when not a stored item), image file (None when
    searched by stored row or vector) and hits; *regions_ms*: ms per query computing query
    regions (None when none were); *verify*: the cost of verification (None without)."""

    labels: list[str]
    rows: list[int | None]
    files: list[str | None]
    hits: list[list[Hit]]
    regions_ms: float | None = None
    verify: VerifyCost | None = None


def answer(engine: SearchEngine, req: SearchRequest) -> SearchResponse:
    """Resolve and embed the queries, search (QE, DBA, re-ranking), then verify the top N."""
    if req.verify and any(q.endswith(".npy") and Path(q).is_file() for q in req.queries):
        raise UsageError("--verify needs query images or stored images; .npy vectors have no keypoints")
    o = req.options
    xq, labels, rows = engine.resolve_queries(req.queries, req.bbox)
    k = max(req.top, req.verify.top) if req.verify else req.top
    files = [q if row is None and not q.endswith(".npy") else None for q, row in zip(req.queries, rows)]
    regions, t_regions = engine.regions_for(o, [(f, row, req.bbox) for f, row in zip(files, rows)])
    hits = engine.search(xq, k=k, qe=o.qe, alpha=o.alpha, dba=o.dba, exclude_rows=rows, rerank=o.rerank,
                         query_regions=regions)
    regions_ms = (1000 * t_regions / len(files) if regions is not None and any(f is not None for f in files)
                  else None)
    out = SearchResponse(labels, rows, files, hits, regions_ms)
    if req.verify:
        out.verify = _verify(engine, req, out)
    return out


def _verify(engine: SearchEngine, req: SearchRequest, res: SearchResponse) -> VerifyCost:
    """Re-order each query's hits by spatial verification (in place), cut to the top; the cost."""
    spec = engine.local_cache(req.local).spec
    if spec.startswith("cnn") and None in res.rows:
        _ = engine.model  # loaded once, before the timings
    t_local = t_verify = 0.0
    for qi, (q, row) in enumerate(zip(req.queries, res.rows)):
        t0 = time.perf_counter()
        qlf = engine.query_local_features(image=None if row is not None else q, row=row, bbox=req.bbox,
                                          name=req.local)
        t1 = time.perf_counter()
        res.hits[qi] = engine.verify(res.hits[qi], qlf, req.verify, name=req.local)[: req.top]
        t_local, t_verify = t_local + t1 - t0, t_verify + time.perf_counter() - t1
    n = len(res.hits)
    return VerifyCost(spec, 1000 * t_local / n, 1000 * t_verify / n)


def query_image(engine: SearchEngine, query: str, row: int | None) -> str | None:
    """The image file of a query string: the file itself, or the stored image of its *row*
    (None for a vector)."""
    if Path(query).is_file() and not query.endswith(".npy"):
        return query
    return engine.store.resolve_path(engine.paths[row]) if row is not None else None


def hit_verdicts(engine: SearchEngine, gt_spec: str | None, row: int | None, hits: list[Hit]) -> list[str] | None:
    """relevant / junk / irrelevant per hit of the stored query *row* under the first ground truth
    of *gt_spec* (None without one, or when the query is not one of its queries)."""
    if not gt_spec:
        return None
    from deepfeat.evaluate import parse_gt_spec

    gt = parse_gt_spec(gt_spec, engine.paths)[0]
    q = next((q for q in gt.queries if q.index == row), None) if row is not None else None
    if q is None:
        return None
    return ["relevant" if h.row in q.relevant else "junk" if h.row in q.junk else "irrelevant" for h in hits]
