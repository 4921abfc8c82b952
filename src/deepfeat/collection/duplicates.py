"""Find duplicate images in a feature store: exact copies by hash, near copies by a k-NN
search confirmed by geometry, grouped, with a keeper per group.

The flow (docs/duplicates.md):

1. **same bytes**: files whose sizes collide are hashed (sha256); equal hashes pair up;
2. **candidates**: every row's k nearest neighbours in the store's index (its saved
   ``index/`` when it is current, else one built in memory, ``index_kind``), kept when
   the cosine is at least ``threshold`` (:mod:`deepfeat.collection.candidates`);
3. **same pixels**: candidates above ``pixel_threshold`` are decoded and their pixels hashed;
4. **confirmation** (``verify``): the other candidates need ``min_inliers`` RANSAC
   inliers between their local features (:mod:`deepfeat.collection.confirm`);
   without it, the threshold alone decides;
5. **groups**: connected components of the confirmed pairs, a keeper chosen by the
   ``keep`` policy (:mod:`deepfeat.collection.groups`).

The defaults are the ones measured best on a near-duplicate set built from real photos
(``benchmarks/bench_duplicates.py``, figures in docs/duplicates.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deepfeat.collection.candidates import PairArrays, is_unit, knn_pairs, l2_normalised, unique_pairs
from deepfeat.collection.groups import DEFAULT_KEEP, FileFacts, choose_keeper, connected_components, parse_keep
from deepfeat.collection.hashing import file_sha256, same_bytes, same_pixels
from deepfeat.data.sources import SourceRecord
from deepfeat.errors import StoreError, UsageError
from deepfeat.store import FeatureStore
from deepfeat.store.items import source_records

log = logging.getLogger(__name__)

#: pair kinds, strongest evidence first
PAIR_KINDS = ("bytes", "pixels", "verified", "similar")
#: the default candidate cosine with verification, and without it (docs/duplicates.md: measured)
VERIFY_THRESHOLD = 0.5
PLAIN_THRESHOLD = 0.9


@dataclass(frozen=True)
class DuplicateSettings:
    """How duplicates are found (module docstring); every field is a CLI option."""

    threshold: float | None = None  # candidate cosine; None: VERIFY_THRESHOLD, or PLAIN_THRESHOLD without verify
    verify: bool = True  # confirm candidates by geometric verification of local features
    extractor: str = "sift"  # local-feature spec used to verify
    min_inliers: int = 16  # inliers that confirm a pair
    k: int = 10  # neighbours searched per image
    keep: str = DEFAULT_KEEP
    exact: bool = True  # pair files with the same bytes / the same decoded pixels
    pixel_threshold: float = 0.99  # candidates at least this close get their pixels hashed
    index_kind: str = "auto"  # the in-memory index when the store has no current saved one
    block: int = 4096  # queries per k-NN block

    def __post_init__(self) -> None:
        if self.threshold is None:
            object.__setattr__(self, "threshold", VERIFY_THRESHOLD if self.verify else PLAIN_THRESHOLD)
        if not -1.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold must be a cosine in [-1, 1], not {self.threshold}")
        if self.k < 1 or self.block < 1:
            raise UsageError(f"k and block must be at least 1 (got k={self.k}, block={self.block})")
        if self.min_inliers < 3:
            raise UsageError(f"--min-inliers must be at least 3 (a similarity needs 3 points), not {self.min_inliers}")
        parse_keep(self.keep)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DuplicatePair:
    """Two feature rows found to be copies: how (``kind``), their cosine and inliers."""

    a: int
    b: int
    kind: str
    score: float | None = None
    inliers: int | None = None


@dataclass(frozen=True)
class MemberFile:
    """A group member's file as it was when the duplicates were found."""

    row: int
    path: str  # as stored
    file: str  # resolved on disk
    width: int
    height: int
    bytes: int
    mtime_ns: int
    sha256: str
    extracted_ns: int  # when the row's store shard was written (the stale-features rule of older stores)
    recorded: SourceRecord | None = None  # the file as the store extracted it (None: a store from before issue 30)


@dataclass
class DuplicateGroup:
    """Rows that are copies of each other (connected by ``pairs``) and the one to keep."""

    rows: list[int]
    keeper: int
    pairs: list[DuplicatePair]

    @property
    def removable(self) -> list[int]:
        return [r for r in self.rows if r != self.keeper]


@dataclass
class DuplicateReport:
    """What :func:`find_duplicates` found; ``to_dict`` is the ``--json`` document."""

    store: str
    settings: DuplicateSettings
    paths: list[str]
    groups: list[DuplicateGroup]
    files: dict[int, MemberFile]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        p = self.paths

        def pair(x: DuplicatePair) -> dict[str, Any]:
            return {"a": p[x.a], "b": p[x.b], "kind": x.kind,
                    "score": None if x.score is None else round(float(x.score), 4), "inliers": x.inliers}

        groups = [{"members": [p[r] for r in g.rows], "keeper": p[g.keeper],
                   "pairs": [pair(x) for x in g.pairs],
                   "files": {p[r]: {k: v for k, v in asdict(self.files[r]).items() if k not in ("row", "path")}
                             for r in g.rows}}
                  for g in self.groups]
        return {"format": "deepfeat-duplicates", "version": 1, "store": self.store,
                "settings": self.settings.to_dict(), "stats": self.stats, "groups": groups}

    def csv_rows(self) -> list[list[Any]]:
        """One row per member: group, path, role (keep/duplicate), width, height, bytes, and
        the best pair joining it to the group (kind, score, inliers)."""
        rows = [["group", "path", "role", "width", "height", "bytes", "kind", "score", "inliers"]]
        for gi, g in enumerate(self.groups, 1):
            for r in g.rows:
                best = min((x for x in g.pairs if r in (x.a, x.b)), key=lambda x: PAIR_KINDS.index(x.kind))
                f = self.files[r]
                rows.append([gi, self.paths[r], "keep" if r == g.keeper else "duplicate", f.width, f.height,
                             f.bytes, best.kind, "" if best.score is None else f"{best.score:.4f}",
                             "" if best.inliers is None else best.inliers])
        return rows


def store_index(store: FeatureStore, xb: np.ndarray, kind: str = "auto"):
    """The store's saved index when it is current and over unit vectors, else one built
    in memory over *xb* (unit rows)."""
    from deepfeat.index import Index
    from deepfeat.search.store_index import INDEX_DIR, index_source_meta

    d = store.path / INDEX_DIR
    if (d / "index.json").is_file():
        index = Index.load(d)
        want = index_source_meta(store, store.feature_name())
        have = index.meta.get("source_meta") or {}
        if all(have.get(k) == v for k, v in want.items()) and index.metric == "ip" and is_unit(store.vectors()[:1000]):
            log.info("using the saved %s index of %s", index.kind, store.path)
            return index
        log.info("the saved index of %s is stale or not over unit vectors; building one in memory", store.path)
    return Index.build(xb, kind=kind, metric="ip")


def _file_facts(store: FeatureStore, rows: list[int], hashes: dict[int, str]) -> dict[int, MemberFile]:
    items = store.ok_items()
    widths, heights = items.column("width").to_pylist(), items.column("height").to_pylist()
    paths, shards = items.column("path").to_pylist(), items.column("shard").to_pylist()
    records = source_records(items)
    feature = store.feature_name()
    written = {s: store.shard_feature_path(s, feature).stat().st_mtime_ns for s in {shards[r] for r in rows}}
    out = {}
    for r in rows:
        f = store.resolve_path(paths[r])
        st = os.stat(f)
        if r not in hashes:
            hashes[r] = file_sha256(f)
        out[r] = MemberFile(r, paths[r], f, int(widths[r] or 0), int(heights[r] or 0), st.st_size, st.st_mtime_ns,
                            hashes[r], written[shards[r]], records[r])
    return out


def _merge(pairs: list[DuplicatePair]) -> dict[tuple[int, int], DuplicatePair]:
    """One pair per (a, b): the strongest kind, with the score and inliers known for it."""
    out: dict[tuple[int, int], DuplicatePair] = {}
    for x in pairs:
        key = (min(x.a, x.b), max(x.a, x.b))
        have = out.get(key)
        if have is None or PAIR_KINDS.index(x.kind) < PAIR_KINDS.index(have.kind):
            score = x.score if x.score is not None else (have.score if have else None)
            inl = x.inliers if x.inliers is not None else (have.inliers if have else None)
            out[key] = DuplicatePair(key[0], key[1], x.kind, score, inl)
    return out


def group_pairs(pairs: dict[tuple[int, int], DuplicatePair], facts: dict[int, MemberFile], paths: list[str],
                keep: str) -> list[DuplicateGroup]:
    """Connected components of *pairs* with their keeper under *keep*."""
    criteria = parse_keep(keep)
    keys = list(pairs)
    comps = connected_components(len(paths), np.array([k[0] for k in keys], np.int64),
                                 np.array([k[1] for k in keys], np.int64))
    groups = []
    for rows in comps:
        ff = [FileFacts(paths[r], facts[r].width * facts[r].height, facts[r].bytes, facts[r].mtime_ns) for r in rows]
        members = set(rows)
        gp = [pairs[k] for k in keys if k[0] in members]
        groups.append(DuplicateGroup(rows, rows[choose_keeper(ff, criteria)], gp))
    return groups


def find_duplicates(store: FeatureStore | str | os.PathLike, settings: DuplicateSettings | None = None,
                    index=None, device: str = "cpu", progress: Callable[[str, int, int], None] | None = None,
                    **overrides: Any) -> DuplicateReport:
    """Groups of duplicate images in *store* (module docstring). *settings* (or keyword
    *overrides* of its fields) say how; *index* replaces the store's index (ids = rows)."""
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if overrides:
        from dataclasses import replace

        settings = replace(settings, **overrides) if settings else DuplicateSettings(**overrides)
    settings = settings or DuplicateSettings()
    paths = store.paths
    if not paths:
        raise StoreError(f"{store.path} has no images to compare")
    files = [store.resolve_path(p) for p in paths]
    stats: dict[str, Any] = {"images": len(paths)}
    t0 = time.perf_counter()
    found: list[DuplicatePair] = []
    hashes: dict[int, str] = {}
    if settings.exact:
        byte_pairs, hashes = same_bytes(files)
        found += [DuplicatePair(a, b, "bytes") for a, b in byte_pairs]
    stats["bytes_pairs"] = len(found)
    t1 = time.perf_counter()
    xb = store.vectors()
    xb = xb if is_unit(xb) else l2_normalised(xb)
    index = index if index is not None else store_index(store, xb, settings.index_kind)
    cand = knn_pairs(xb, index, settings.threshold, settings.k, settings.block)
    stats["candidates"] = len(cand)
    t2 = time.perf_counter()
    found += _confirm(store, files, cand, settings, device, progress, stats)
    t3 = time.perf_counter()
    pairs = _merge(found)
    rows = sorted({r for k in pairs for r in k})
    facts = _file_facts(store, rows, hashes)
    groups = group_pairs(pairs, facts, paths, settings.keep)
    stats.update(pairs=len(pairs), groups=len(groups), duplicates=sum(len(g.rows) - 1 for g in groups),
                 seconds={"hash": round(t1 - t0, 3), "knn": round(t2 - t1, 3), "confirm": round(t3 - t2, 3),
                          "total": round(time.perf_counter() - t0, 3)})
    return DuplicateReport(str(store.path), settings, paths, groups, facts, stats)


def _confirm(store: FeatureStore, files: list[str], cand: PairArrays, settings: DuplicateSettings, device: str,
             progress, stats: dict[str, Any]) -> list[DuplicatePair]:
    """The candidates that are copies: identical pixels, or verified (or all, without verification)."""
    out: list[DuplicatePair] = []
    near = cand.score >= settings.pixel_threshold
    if settings.exact and near.any():
        px = same_pixels(files, np.concatenate([cand.a[near], cand.b[near]]))
        score = {(int(a), int(b)): float(s) for a, b, s in zip(cand.a[near], cand.b[near], cand.score[near])}
        out += [DuplicatePair(a, b, "pixels", score.get((min(a, b), max(a, b)))) for a, b in px]
    stats["pixel_pairs"] = len(out)
    if not settings.verify:
        out += [DuplicatePair(int(a), int(b), "similar", float(s)) for a, b, s in zip(cand.a, cand.b, cand.score)]
        return out
    from deepfeat.collection.confirm import confirm_pairs, feature_source
    from deepfeat.localfeat.verify import VerifyParams

    params = VerifyParams(top=1, min_inliers=settings.min_inliers)
    feats = feature_source(store, settings.extractor, device)
    inl = confirm_pairs(cand.a, cand.b, feats, params,
                        None if progress is None else (lambda i, n: progress("verify", i, n)), spec=settings.extractor)
    ok = inl >= settings.min_inliers
    stats["verified"] = len(cand)
    out += [DuplicatePair(int(a), int(b), "verified", float(s), int(n))
            for a, b, s, n in zip(cand.a[ok], cand.b[ok], cand.score[ok], inl[ok])]
    return out


def group_vectors(xb: np.ndarray, threshold: float, k: int = 10, index=None, kind: str = "auto",
                  block: int = 4096) -> tuple[list[list[int]], PairArrays]:
    """Groups of rows of *xb* (N x D) whose cosine passes *threshold* among k neighbours,
    without files: the k-NN and components steps alone (used by the scale benchmark)."""
    from deepfeat.index import Index

    xb = xb if is_unit(xb) else l2_normalised(xb)
    index = index if index is not None else Index.build(xb, kind=kind, metric="ip")
    pairs = knn_pairs(xb, index, threshold, k, block)
    return connected_components(len(xb), pairs.a, pairs.b), pairs


__all__ = [
    "PAIR_KINDS",
    "DuplicateGroup",
    "DuplicatePair",
    "DuplicateReport",
    "DuplicateSettings",
    "MemberFile",
    "find_duplicates",
    "group_vectors",
    "unique_pairs",
]
