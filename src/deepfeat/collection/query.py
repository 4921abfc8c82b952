"""Is this image already in my collection? New images checked against a store's duplicates
rules: the same bytes, the same pixels, or a near copy confirmed by geometry (the steps of
:mod:`deepfeat.collection.duplicates`, one query at a time). The store is not changed unless
asked: :func:`add_queries` then appends the queried images through extraction's append path.

Queries are embedded exactly as the store was made (:class:`deepfeat.search.SearchEngine`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepfeat.collection.candidates import is_unit, l2_normalised
from deepfeat.collection.duplicates import DuplicateSettings, store_index
from deepfeat.collection.hashing import file_sha256, pixel_sha256
from deepfeat.store import FeatureStore


@dataclass(frozen=True)
class Match:
    """A stored image that the query duplicates."""

    path: str  # as stored
    kind: str  # bytes | pixels | verified | similar
    score: float
    inliers: int | None = None


@dataclass
class QueryResult:
    query: str
    matches: list[Match] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"query": self.query, "duplicate": bool(self.matches),
                "matches": [{"path": m.path, "kind": m.kind, "score": round(m.score, 4), "inliers": m.inliers}
                            for m in self.matches]}


def query_duplicates(store: FeatureStore | str | os.PathLike, images: Sequence[str],
                     settings: DuplicateSettings | None = None, device: str = "cpu",
                     xq: np.ndarray | None = None, graph_cache: bool = False) -> list[QueryResult]:
    """For each image file in *images*, the stored images it duplicates (best evidence first).
    *xq*: the images' descriptors when the caller has them (the server embeds uploads itself);
    *graph_cache*: embed them with the store's prepared graph where there is one (docs/startup.md)."""
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    settings = settings or DuplicateSettings()
    if xq is None:
        from deepfeat.search import SearchEngine

        xq, _, _ = SearchEngine(store, device=device, graph_cache=graph_cache).resolve_queries(list(images))
    xq = xq if is_unit(xq) else l2_normalised(xq)
    xb = store.vectors()
    index = store_index(store, xb if is_unit(xb) else l2_normalised(xb), settings.index_kind)
    D, I = index.search(np.ascontiguousarray(xq, dtype=np.float32), min(settings.k, index.ntotal))
    paths = store.paths
    feats = extractor = None
    if settings.verify:
        from deepfeat.collection.confirm import feature_source
        from deepfeat.localfeat.cache import open_extractor
        from deepfeat.localfeat.features import parse_local_spec

        feats = feature_source(store, settings.extractor, device)
        extractor = open_extractor(store, settings.extractor, device)
        sift = parse_local_spec(settings.extractor).extractor == "sift"
    out = []
    for qi, image in enumerate(images):
        res = QueryResult(image)
        qsha, qpix, qlf = file_sha256(image), None, None
        for score, row in zip(D[qi].tolist(), I[qi].tolist()):
            if row < 0 or score < settings.threshold:
                continue
            file = store.resolve_path(paths[row])
            if settings.exact and os.path.exists(file) and os.path.getsize(file) == os.path.getsize(image) \
                    and file_sha256(file) == qsha:
                res.matches.append(Match(paths[row], "bytes", score))
                continue
            if settings.exact and score >= settings.pixel_threshold:
                qpix = qpix or pixel_sha256(image)
                if os.path.exists(file) and pixel_sha256(file) == qpix:
                    res.matches.append(Match(paths[row], "pixels", score))
                    continue
            if not settings.verify:
                res.matches.append(Match(paths[row], "similar", score))
                continue
            from deepfeat.collection.confirm import pair_inliers
            from deepfeat.localfeat.verify import VerifyParams

            qlf = qlf or extractor.extract(image)
            n = pair_inliers(qlf, feats(row), VerifyParams(top=1, min_inliers=settings.min_inliers), sift=sift)
            if n >= settings.min_inliers:
                res.matches.append(Match(paths[row], "verified", score, n))
        out.append(res)
    return out


@dataclass
class AddResult:
    """What :func:`add_queries` did: the images appended, those left out and why."""

    added: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # image -> reason
    failed: int = 0  # images the extraction could not read (listed in the store's failures.csv)

    def to_dict(self) -> dict:
        return {"added": self.added, "skipped": self.skipped, "failed": self.failed}


def add_queries(store: FeatureStore | str | os.PathLike, results: Sequence[QueryResult],
                unique_only: bool = False, graph_cache: bool = False) -> AddResult:
    """Append the queried images of *results* to *store*, after they were checked: every one,
    or with *unique_only* those that duplicate nothing in the store as it was. The run is an
    extraction into the store with the store's own settings (the append contract,
    :mod:`deepfeat.pipeline.append`), under its writer lock; an image the store already lists
    (the same file) is left as it is. Two new images that copy each other are both added
    (each is new to the store): ``deepfeat duplicates STORE`` then groups them. *graph_cache*: as
    :attr:`~deepfeat.pipeline.ExtractConfig.graph_cache` (the CLI's default: on)."""
    from deepfeat.pipeline import ExtractConfig, extract

    path = store.path if isinstance(store, FeatureStore) else Path(store)
    out = AddResult()
    fs = FeatureStore(path)
    plan = fs.read_plan()  # every file the store lists, including those it could not read
    known = {os.path.realpath(fs.resolve_path(p)) for p in (plan.column("path").to_pylist() if plan is not None else fs.paths)}
    todo = []
    for r in results:
        if unique_only and r.matches:
            out.skipped[r.query] = f"duplicate of {r.matches[0].path} ({r.matches[0].kind})"
        elif os.path.realpath(r.query) in known:
            out.skipped[r.query] = "already in the store"
        elif r.query not in todo:
            todo.append(r.query)
    if todo:
        rep = extract(ExtractConfig(inputs=todo, output=os.fspath(path), progress="none", given=frozenset(),
                                    graph_cache=graph_cache))
        out.failed = rep.failed
        out.added = todo
    return out
