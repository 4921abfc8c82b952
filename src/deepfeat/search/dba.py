"""Database-side augmentation for a :class:`~deepfeat.search.engine.SearchEngine`: the augmented
vectors and their index, computed once and saved beside the store's index
(``STORE/index/dba-n<n>-a<alpha>.{faiss,json,npy}``), recomputed when stale."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.errors import StoreError
from deepfeat.search.store_index import INDEX_DIR, index_source_meta

log = logging.getLogger(__package__)  # "deepfeat.search", as before the package split


class DBAMixin:
    """:class:`~deepfeat.search.engine.SearchEngine`'s DBA vectors, saved beside the index."""

    def _dba_base(self) -> dict[str, Any]:
        """What the DBA neighbours came from: the saved index (kind, build time) or exact search."""
        if self.index is None:
            return {"kind": "flat", "saved": False}
        m = self.index.meta
        return {"kind": m.get("kind"), "params": m.get("params"), "built_at": m.get("built_at"), "saved": True}

    def dba(self, n: int, alpha: float = 0.0) -> tuple[Any, np.ndarray]:
        """(index, vectors) of the database augmented with *n* neighbours (alpha-weighted), computed
        once and saved as ``STORE/index/dba-n<n>-a<alpha>.{faiss,json,npy}``; recomputed (and saved
        again) when the store or its index changed since (the index's ``source_meta`` check, plus the
        index the neighbours came from). A read-only store keeps them in memory only."""
        from deepfeat.index import dba_index

        key = (int(n), float(alpha))
        if key in self._dba_cache:
            return self._dba_cache[key]
        stem = self.store.path / INDEX_DIR / f"dba-n{int(n)}-a{float(alpha):g}"
        want = {"source_meta": index_source_meta(self.store, self.feature), "base": self._dba_base(),
                "augmentation": {"method": "dba", "n": int(n), "alpha": float(alpha)}}
        found = self._load_dba(stem, want)
        if found is None:
            found = dba_index(self.active_index, self.xb, n, alpha)
            self._save_dba(stem, found, want)
        self._dba_cache[key] = found
        return found

    def _load_dba(self, stem: Path, want: dict[str, Any]) -> tuple[Any, np.ndarray] | None:
        from deepfeat.index import Index
        from deepfeat.store.checksums import size_problem

        meta_path = stem.with_suffix(".json")
        if not meta_path.is_file():
            return None
        try:
            index = Index.load(meta_path, threads=self.threads)
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

    def _save_dba(self, stem: Path, found: tuple[Any, np.ndarray], want: dict[str, Any]) -> None:
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
