"""A feature store as a search engine: queries embedded exactly as the store was made.

:class:`SearchEngine` opens a store, its FAISS index (``STORE/index/``, built by
``deepfeat index``; exact search when there is none), and, only when an image query
arrives, the model and descriptor network described by the store's own ``meta.json``:
same model and weights, layer(s), pooling (and MOP codebook), scales, size policy and
post-processing. Queries can be image files (optionally a region ``x1,y1,x2,y2`` cut
out first, as the Oxford protocol requires), rows/ids/paths already in the store, or
vectors. Results carry the store's ids and paths.

The engine is put together from one mixin per part: the queries
(:mod:`deepfeat.search.queries`), spatial verification (:mod:`deepfeat.search.verification`),
the query regions of regional diffusion (:mod:`deepfeat.search.regions`) and the DBA vectors
saved beside the index (:mod:`deepfeat.search.dba`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from deepfeat.errors import StoreError, UsageError
from deepfeat.search.dba import DBAMixin
from deepfeat.search.hits import Hit
from deepfeat.search.queries import QueriesMixin
from deepfeat.search.ranking import _drop_rows, rank_arrays
from deepfeat.search.regions import RegionsMixin
from deepfeat.search.store_index import INDEX_DIR, index_source_meta
from deepfeat.search.verification import VerificationMixin
from deepfeat.store import FeatureStore

log = logging.getLogger(__package__)  # "deepfeat.search", as before the package split


class SearchEngine(QueriesMixin, VerificationMixin, RegionsMixin, DBAMixin):
    """Search a feature store (see the module docstring)."""

    def __init__(self, store: str | os.PathLike | FeatureStore, feature: str | None = None, device: str = "cpu",
                 use_index: bool = True, threads: int | None = None):
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
        self.index = self._open_index() if use_index else None
        self._fnet = None
        self._model = None
        self._dba_cache: dict[tuple[int, float], tuple[Any, np.ndarray]] = {}
        self._local: dict[str | None, Any] = {}  # local-feature caches and their query extractors
        self._local_x: dict[str | None, Any] = {}
        self._dba_exact: dict[tuple[int, float], np.ndarray] = {}
        self._rerankers: dict[tuple[str, int, float], Any] = {}

    # -- index ----------------------------------------------------------------

    def _open_index(self):
        from deepfeat.index import Index

        d = self.store.path / INDEX_DIR
        if not (d / "index.json").is_file():
            return None
        index = Index.load(d, threads=self.threads)
        want = index_source_meta(self.store, self.feature)
        have = index.meta.get("source_meta") or {}
        # an index saved before fingerprints were recorded is judged by the rest
        stale = [k for k in want if have.get(k) != want[k] and (k != "store_fingerprint" or k in have)]
        if stale:
            log.warning("index in %s is stale (%s differ); using exact search. Rebuild with `deepfeat index`.",
                        d, ", ".join(stale))
            return None
        return index

    @property
    def exact_index(self):
        """A flat (exact) index over the vectors, for when no saved index applies."""
        from deepfeat.index import Index

        if getattr(self, "_flat", None) is None:
            self._flat = Index.build(self.xb, kind="flat", metric="ip",
                                     ids=np.arange(len(self.xb), dtype=np.int64), threads=self.threads)
        return self._flat

    @property
    def active_index(self):
        return self.index if self.index is not None else self.exact_index

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
                I0 = _drop_rows(I0, exclude_rows, qe)
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
        from deepfeat.index import database_side_augmentation

        rr = self.reranker(rerank, dba, alpha) if rerank else None
        xb = self.xb
        if dba and self.active_index.kind == "flat":  # the saved DBA vectors are exact: reuse them
            xb = self.dba(dba, alpha)[1]
        elif dba:
            key = (int(dba), float(alpha))
            if key not in self._dba_exact:
                self._dba_exact[key] = database_side_augmentation(xb, dba, alpha, self.exact_index)
            xb = self._dba_exact[key]
        inputs = rr.query_inputs(query_regions, query_rows, len(xq)) if rr is not None else {}
        return rank_arrays(xq, xb, qe, alpha, rr, query_rows if not dba else None,
                           index=self.exact_index if not dba else None, **inputs)
