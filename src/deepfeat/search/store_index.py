"""The FAISS index saved in a store (``STORE/index/``, built by ``deepfeat index``) and what it
must agree on with the store to be used."""

from __future__ import annotations

from typing import Any

import numpy as np

from deepfeat.errors import StoreError
from deepfeat.store import FeatureStore
from deepfeat.store.checksums import store_fingerprint

INDEX_DIR = "index"


def index_source_meta(store: FeatureStore, feature: str) -> dict[str, Any]:
    """What an index must agree on with its store to be usable."""
    return {
        "store_created": store.meta.get("created"),
        "model": store.meta["model"].get("spec"),
        "weights_sha256": store.meta["model"].get("weights_sha256"),
        "feature": feature,
        "pooling": store.meta.get("pooling"),
        "post": store.meta.get("post"),
        "post_fitted_rows": store.meta.get("post_fitted_rows"),
        "rows": len(store),
        # what the vectors are: an index built from other vectors (another store's) has another one
        "store_fingerprint": store_fingerprint((store.meta.get("checksums") or {}).get("files") or {}),
    }


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
    index.save(store.path / INDEX_DIR)
    return index
