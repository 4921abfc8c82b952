"""Database-side augmentation for a search: :class:`DBACache`, the augmented vectors and their
index, computed once and saved beside the store's index
(``STORE/index/dba-n<n>-a<alpha>.{faiss,json,npy}``), recomputed when stale."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.errors import StoreError, UsageError
from deepfeat.search.store_index import INDEX_DIR, StoreIndex, index_source_meta
from deepfeat.store import FeatureStore

log = logging.getLogger(__name__)


class DBACache:
    """The DBA vectors of one store feature: saved beside the index (:meth:`get`), or exact
    and in memory only (:meth:`exact`, for full rankings)."""

    def __init__(self, store: FeatureStore, feature: str, indexes: StoreIndex):
        self.store = store
        self.feature = feature
        self.indexes = indexes
        self._saved: dict[tuple[int, float], tuple[Any, np.ndarray]] = {}
        self._exact: dict[tuple[int, float], np.ndarray] = {}

    @property
    def xb(self) -> np.ndarray:
        return self.indexes.xb

    def base(self) -> dict[str, Any]:
        """What the DBA neighbours came from: the saved index (kind, build time) or exact search."""
        if self.indexes.saved is None:
            return {"kind": "flat", "saved": False}
        m = self.indexes.saved.meta
        return {"kind": m.get("kind"), "params": m.get("params"), "built_at": m.get("built_at"), "saved": True}

    def get(self, n: int, alpha: float = 0.0) -> tuple[Any, np.ndarray]:
        """(index, vectors) of the database augmented with *n* neighbours (alpha-weighted), computed
        once and saved as ``STORE/index/dba-n<n>-a<alpha>.{faiss,json,npy}``; recomputed (and saved
        again) when the store or its index changed since (the index's ``source_meta`` check, plus the
        index the neighbours came from). A read-only store keeps them in memory only."""
        from deepfeat.index import dba_index

        key = (int(n), float(alpha))
        if key in self._saved:
            return self._saved[key]
        stem = self.store.path / INDEX_DIR / f"dba-n{int(n)}-a{float(alpha):g}"
        want = {"source_meta": index_source_meta(self.store, self.feature), "base": self.base(),
                "augmentation": {"method": "dba", "n": int(n), "alpha": float(alpha)}}
        found = self._load(stem, want)
        if found is None:
            if (self.indexes.active.meta or {}).get("storage"):  # FAISS cannot clone lists kept on disk
                raise UsageError("--dba rebuilds the index over the augmented vectors, which an index with on-disk "
                                 f"lists ({self.store.path / INDEX_DIR}) cannot do; search without --dba, or build "
                                 "an in-memory index (`deepfeat index STORE` without --max-memory)")
            found = dba_index(self.indexes.active, self.xb, n, alpha)
            self._save(stem, found, want)
        self._saved[key] = found
        return found

    def exact(self, n: int, alpha: float = 0.0) -> np.ndarray:
        """The database augmented with its *n* exact nearest neighbours: the saved vectors when the
        index is flat (they are exact), else computed with the exact index, kept in memory."""
        from deepfeat.index import database_side_augmentation

        if self.indexes.active.kind == "flat":
            return self.get(n, alpha)[1]
        key = (int(n), float(alpha))
        if key not in self._exact:
            self._exact[key] = database_side_augmentation(self.xb, n, alpha, self.indexes.exact)
        return self._exact[key]

    def _load(self, stem: Path, want: dict[str, Any]) -> tuple[Any, np.ndarray] | None:
        from deepfeat.index import Index
        from deepfeat.store.checksums import size_problem

        meta_path = stem.with_suffix(".json")
        if not meta_path.is_file():
            return None
        try:
            index = Index.load(meta_path, threads=self.indexes.threads)
            m = index.meta
            stale = [k for k in ("source_meta", "base") if m.get("dba", {}).get(k) != want[k]]
            stale += ["augmentation"] if m.get("augmentation") != want["augmentation"] else []
            if stale:
                log.info("saved DBA vectors %s are stale (%s changed); recomputing", meta_path, ", ".join(stale))
                return None
            npy = stem.with_suffix(".npy")
            problem = size_problem(npy, (m.get("files") or {}).get(npy.name))
            if problem:
                raise StoreError(problem)
            xb = np.load(npy, mmap_mode="r", allow_pickle=False)
            if xb.shape != self.xb.shape:
                raise StoreError(f"{npy} holds {xb.shape} vectors, the store {self.xb.shape}")
        except (StoreError, ValueError, OSError) as e:
            log.warning("cannot use the saved DBA vectors %s (%s); recomputing", meta_path, e)
            return None
        return index, np.ascontiguousarray(xb, dtype=np.float32)

    def _save(self, stem: Path, found: tuple[Any, np.ndarray], want: dict[str, Any]) -> None:
        from deepfeat.store import atomic_save_npy
        from deepfeat.store.checksums import file_digest

        index, xb = found
        try:
            stem.parent.mkdir(exist_ok=True)
            npy = stem.with_suffix(".npy")
            atomic_save_npy(npy, xb)  # the vectors first; the index meta, written last, commits both
            index._meta["dba"] = {"source_meta": want["source_meta"], "base": want["base"]}
            index._meta["files"] = {npy.name: file_digest(npy)}
            index.save(stem.with_suffix(".faiss"))
        except OSError as e:
            log.warning("cannot save the DBA vectors beside the index (%s); keeping them in memory", e)
