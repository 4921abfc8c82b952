"""The FAISS index saved in a store (``STORE/index/``, built by ``deepfeat index``), what it
must agree on with the store to be used, and :class:`StoreIndex`: that saved index, or exact
search when there is none or it is stale."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from deepfeat.errors import StoreError
from deepfeat.index.update import INDEX_DIR, index_source_meta, save_rows
from deepfeat.store import FeatureStore

log = logging.getLogger(__name__)

__all__ = ["INDEX_DIR", "StoreIndex", "build_index", "index_source_meta", "open_saved_index"]


def build_index(store: FeatureStore, kind: str = "auto", metric: str = "ip", feature: str | None = None,
                threads: int | None = None, **params: Any):
    """Build and save a FAISS index over the store's vectors (ids = feature rows)."""
    from deepfeat.index import Index

    feature = store.feature_name(feature)
    xb = store.vectors(feature)
    if len(xb) == 0:
        raise StoreError(f"{store.path} has no features to index")
    index = Index.build(xb, kind=kind, metric=metric, ids=np.arange(len(xb), dtype=np.int64), threads=threads,
                       source_meta=index_source_meta(store, feature), **params)
    folder = store.path / INDEX_DIR
    folder.mkdir(exist_ok=True)
    save_rows(folder, store.ids, index._meta)  # the item id of each row: removals update the index in place
    index.save(folder)
    from deepfeat.index.ondisk import LISTS_FILE

    (folder / LISTS_FILE).unlink(missing_ok=True)  # an on-disk index's lists, replaced: unused now
    return index


def open_saved_index(store: FeatureStore, feature: str, threads: int | None = None):
    """The index saved in *store* for *feature*, or None when there is none or it is stale
    (a warning says so: searches are then exact)."""
    from deepfeat.index import Index

    d = store.path / INDEX_DIR
    if not (d / "index.json").is_file():
        return None
    index = Index.load(d, threads=threads)
    want = index_source_meta(store, feature)
    have = index.meta.get("source_meta") or {}
    # an index saved before fingerprints were recorded is judged by the rest
    stale = [k for k in want if have.get(k) != want[k] and (k != "store_fingerprint" or k in have)]
    if stale:
        log.warning("index in %s is stale (%s differ); using exact search. Rebuild with `deepfeat index`.",
                    d, ", ".join(stale))
        return None
    return index


class StoreIndex:
    """The indexes a search uses over the store's vectors *xb*: the *saved* one (None when
    there is none or it is stale) and an exact (flat) one, built on first use."""

    def __init__(self, xb: np.ndarray, saved: Any = None, threads: int | None = None):
        self.xb = xb
        self.saved = saved
        self.threads = threads
        self._exact = None

    @property
    def exact(self):
        """A flat (exact) index over the vectors, for when no saved index applies."""
        from deepfeat.index import Index

        if self._exact is None:
            self._exact = Index.build(self.xb, kind="flat", metric="ip",
                                      ids=np.arange(len(self.xb), dtype=np.int64), threads=self.threads)
        return self._exact

    @property
    def active(self):
        """The saved index if there is one, else the exact one."""
        return self.saved if self.saved is not None else self.exact
