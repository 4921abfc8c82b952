"""A feature store as a search engine: queries embedded exactly as the store was made.

:class:`SearchEngine` opens a store, its FAISS index (``STORE/index/``, built by
``deepfeat index``; exact search when there is none), and, only when an image query
arrives, the model and descriptor network described by the store's own ``meta.json``:
same model and weights, layer(s), pooling (and MOP codebook), scales, size policy and
post-processing. Queries can be image files (optionally a region ``x1,y1,x2,y2`` cut
out first, as the Oxford protocol requires), rows/ids/paths already in the store, or
vectors. Results carry the store's ids and paths.

The engine holds one collaborator per part and delegates to them: the indexes
(:class:`~deepfeat.search.store_index.StoreIndex`), the query embedder
(:class:`~deepfeat.search.queries.QueryEmbedder`), the store's local features
(:class:`~deepfeat.search.local.LocalSections`), spatial verification
(:class:`~deepfeat.search.verification.SpatialVerifier`), the query regions of regional
diffusion (:class:`~deepfeat.search.regions.QueryRegions`) and the DBA vectors saved beside
the index (:class:`~deepfeat.search.dba.DBACache`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from deepfeat.errors import StoreError, UsageError
from deepfeat.search.dba import DBACache
from deepfeat.search.hits import Hit
from deepfeat.search.local import LocalSections
from deepfeat.search.options import SearchOptions
from deepfeat.search.queries import QueryEmbedder
from deepfeat.search.ranking import drop_rows, rank_arrays
from deepfeat.search.regions import QueryRegions
from deepfeat.search.store_index import StoreIndex, open_saved_index
from deepfeat.search.verification import SpatialVerifier
from deepfeat.store import FeatureStore


class SearchEngine:
    """Search a feature store (see the module docstring)."""

    def __init__(self, store: str | os.PathLike | FeatureStore, feature: str | None = None, device: str = "cpu",
                 use_index: bool = True, threads: int | None = None, graph_cache: bool = False):
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        self.feature = self.store.feature_name(feature)
        self.xb = self.store.vectors(self.feature)
        if len(self.xb) == 0:
            raise StoreError(f"{self.store.path} has no features to search")
        items = self.store.ok_items()
        self.ids = items.column("id").to_numpy()
        self.paths = items.column("path").to_pylist()
        self._path_rows = {p: i for i, p in enumerate(self.paths)}
        self.device = device
        self.threads = threads
        saved = open_saved_index(self.store, self.feature, threads) if use_index else None
        self.indexes = StoreIndex(self.xb, saved, threads)
        self.embedder = QueryEmbedder(self.store, self.feature, device, graph_cache)
        self.local = LocalSections(self.store, self.embedder)
        self.verifier = SpatialVerifier(self.local)
        self.regions = QueryRegions(self.local, self.paths)
        self.dba_cache = DBACache(self.store, self.feature, self.indexes)
        self._rerankers: dict[tuple[str, int, float], Any] = {}

    # -- indexes ----------------------------------------------------------------

    @property
    def index(self):
        """The index saved in the store, None when there is none (or it is stale)."""
        return self.indexes.saved

    @property
    def exact_index(self):
        """A flat (exact) index over the vectors, for when no saved index applies."""
        return self.indexes.exact

    @property
    def active_index(self):
        return self.indexes.active

    def dba(self, n: int, alpha: float = 0.0) -> tuple[Any, np.ndarray]:
        """(index, vectors) of the database augmented with *n* neighbours (:meth:`DBACache.get`)."""
        return self.dba_cache.get(n, alpha)

    # -- queries ------------------------------------------------------------------

    @property
    def model(self):
        return self.embedder.model

    @property
    def feature_net(self):
        return self.embedder.feature_net

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Descriptors (post-processed) of decoded images of the store's size policy."""
        return self.embedder.embed_pixels(pixels)

    def decode(self, image: str | os.PathLike | BinaryIO, bbox: Sequence[float] | None = None) -> np.ndarray:
        return self.embedder.decode(image, bbox)

    def embed_images(self, images: Sequence[str | os.PathLike | BinaryIO],
                     bboxes: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
        """Descriptors of image files (or file objects), each optionally cropped to a box."""
        return self.embedder.embed_images(images, bboxes)

    def row(self, key: str | int) -> int:
        """Feature row of a store id (int or digits) or a stored path."""
        if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit()):
            hit = np.nonzero(self.ids == int(key))[0]
            if not len(hit):
                raise UsageError(f"id {key} is not in the store (or failed to extract)")
            return int(hit[0])
        for cand in (key, os.path.normpath(key)):
            if cand in self._path_rows:
                return self._path_rows[cand]
        raise UsageError(f"{key!r} is not a path or id in the store")

    def resolve_queries(self, queries: Sequence[str], bbox: Sequence[float] | None = None
                        ) -> tuple[np.ndarray, list[str], list[int | None]]:
        """Turn CLI query strings into vectors: ``.npy`` files, stored paths/ids, or image files.

        Returns (xq, labels, rows) where rows[i] is the store row of a stored query (or None)."""
        vecs, labels, rows = [], [], []
        for q in queries:
            if q.endswith(".npy") and Path(q).is_file():
                try:
                    v = np.load(q, allow_pickle=False).astype(np.float32)
                except ValueError as e:  # objects (pickles refused), strings, a damaged header
                    raise UsageError(f"{q} does not hold numeric vectors: {e}") from None
                v = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v.reshape(1, -1)
                if v.shape[1] != self.xb.shape[1]:
                    raise UsageError(f"{q}: vectors of dim {v.shape[1]}, the store's are {self.xb.shape[1]}")
                vecs.append(v)
                labels.extend([f"{q}[{i}]" for i in range(len(v))])
                rows.extend([None] * len(v))
                continue
            row = None
            if bbox is None:
                try:
                    row = self.row(q)
                except UsageError:
                    row = None
            if row is not None:
                vecs.append(self.xb[row: row + 1])
                labels.append(self.paths[row])
                rows.append(row)
                continue
            if not Path(q).is_file():
                raise UsageError(f"query {q!r} is not an image file, a .npy file, or a path/id in the store")
            vecs.append(self.embed_images([q], [bbox]))
            labels.append(q + (f" [{','.join(str(v) for v in bbox)}]" if bbox else ""))
            rows.append(None)
        return np.ascontiguousarray(np.concatenate(vecs), dtype=np.float32), labels, rows

    # -- local features: verification, regions ---------------------------------------

    def local_cache(self, name: str | None = None, regions: bool = False):
        """The store's cached local features (:meth:`LocalSections.cache`)."""
        return self.local.cache(name, regions)

    def query_local_features(self, image: str | os.PathLike | BinaryIO | None = None, row: int | None = None,
                             bbox: Sequence[float] | None = None, name: str | None = None):
        """Local features of a query (:meth:`SpatialVerifier.query_features`)."""
        return self.verifier.query_features(image, row, bbox, name)

    def verify(self, hits: list[Hit], query_features, params, name: str | None = None) -> list[Hit]:
        """*hits* re-ordered by spatial verification (:meth:`SpatialVerifier.verify`)."""
        return self.verifier.verify(hits, query_features, params, name)

    def query_regions(self, image: str | os.PathLike | BinaryIO | None = None, row: int | None = None,
                      bbox: Sequence[float] | None = None, name: str | None = None) -> np.ndarray:
        """Regional descriptors (R x D) of a query, for regional diffusion (:meth:`QueryRegions.of`)."""
        return self.regions.of(image, row, bbox, name)

    def regions_for(self, options: SearchOptions, queries: Sequence[tuple[Any, int | None, Sequence[float] | None]]
                    ) -> tuple[list[np.ndarray | None] | None, float]:
        """For a regional re-ranking, each query's regional descriptors: None for a whole stored
        image (its cached regions are used), else those of its region or file (:meth:`query_regions`).
        *queries*: (image file or None, stored row or None, box or None) per query. Returns
        (regions, or None when *options*' re-ranking needs none; seconds spent)."""
        rr = self.reranker(options.rerank, options.dba, options.alpha) if options.rerank else None
        if not getattr(rr, "needs_regions", False):  # also checks, early, that the store has regions
            return None, 0.0
        t0 = time.perf_counter()
        out = [None if (row is not None and bbox is None) or (image is None and row is None) else
               self.query_regions(image=image, row=row, bbox=bbox, name=rr.section) for image, row, bbox in queries]
        return out, time.perf_counter() - t0

    # -- search -----------------------------------------------------------------

    def reranker(self, spec: Any, dba: int = 0, alpha: float = 0.0):
        """The :mod:`deepfeat.rerank` re-ranker for *spec*, one per (spec, DBA setting), kept with its
        offline part (diffusion's k-NN graph) so that it is built once per engine."""
        from deepfeat.rerank import get_reranker

        r = get_reranker(spec)
        key = (r.spec, int(dba), float(alpha) if dba else 0.0)
        if key not in self._rerankers and getattr(r, "needs_regions", False):  # regional diffusion
            r.attach(self.local_cache(r.section, regions=True))
        return self._rerankers.setdefault(key, r)

    def rerank_stats(self) -> list[dict[str, Any]]:
        """Cost of each re-ranker used so far: offline seconds (graph build), ms per query."""
        return [r.stats for r in self._rerankers.values()]

    def search(self, xq: np.ndarray, k: int = 10, qe: int = 0, alpha: float = 0.0, dba: int = 0,
               exclude_rows: Sequence[int | None] | None = None, rerank: str | None = None,
               query_regions: Sequence[np.ndarray | None] | None = None) -> list[list[Hit]]:
        """Top-*k* hits per query, with optional alpha-QE and DBA (see :mod:`deepfeat.index`), then an
        optional re-ranking of the shortlist (``rerank="diffusion"``, ``"kreciprocal:k1=20"``...,
        :mod:`deepfeat.rerank`); re-ranked hits carry the re-ranker's score.

        *exclude_rows* drops a query's own row from its results (searching by a stored image).
        *query_regions*: each query's regional descriptors (:meth:`query_regions`) for
        ``regional-diffusion``; a stored query (*exclude_rows*) without them uses its cached ones."""
        from deepfeat.index import alpha_query_expansion

        if k < 1:
            raise UsageError(f"--top must be at least 1, not {k}")
        rr = self.reranker(rerank, dba, alpha) if rerank else None
        index, xb = self.active_index, self.xb
        if dba:
            index, xb = self.dba(dba, alpha)
        extra = 1 if exclude_rows is not None and any(r is not None for r in exclude_rows) else 0
        kk = min(len(xb), k + extra)
        if qe:
            _, I0 = index.search(xq, min(len(xb), qe + extra))
            if extra:
                I0 = drop_rows(I0, exclude_rows, qe)
            xq = alpha_query_expansion(xq, xb, I0, None, qe, alpha)
        if rr is not None:
            _, I = index.search(xq, min(len(xb), max(kk, rr.shortlist(len(xb)))))
            # a stored query is its own database row only while neither QE nor DBA changed it
            rows = exclude_rows if not (qe or dba) else None
            I, D = rr.rerank(xq, xb, I, rows, index=index, **rr.query_inputs(query_regions, exclude_rows, len(xq)))
        else:
            D, I = index.search(xq, kk)
        out = []
        for qi in range(len(xq)):
            hits = []
            skip = exclude_rows[qi] if exclude_rows is not None else None
            for d, i in zip(D[qi], I[qi]):
                if i < 0 or (skip is not None and i == skip):
                    continue
                hits.append(Hit(len(hits) + 1, int(i), int(self.ids[i]), self.paths[i], float(d)))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def rank_all(self, xq: np.ndarray, qe: int = 0, alpha: float = 0.0, dba: int = 0, rerank: str | None = None,
                 query_rows: Sequence[int | None] | None = None,
                 query_regions: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
        """Full rankings (Q x N feature rows), exact, for evaluation; *rerank* re-orders each query's
        shortlist (:meth:`search`), the rest keeps the global order. *query_rows*: the store row of
        each query that is a stored item (None for others), which k-reciprocal re-ranking uses, and
        regional diffusion for the cached regions of a query without *query_regions*."""
        rr = self.reranker(rerank, dba, alpha) if rerank else None
        xb = self.dba_cache.exact(dba, alpha) if dba else self.xb
        inputs = rr.query_inputs(query_regions, query_rows, len(xq)) if rr is not None else {}
        return rank_arrays(xq, xb, qe, alpha, rr, query_rows if not dba else None,
                           index=self.exact_index if not dba else None, **inputs)
