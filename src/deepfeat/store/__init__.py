"""The on-disk feature store: shards of N x D arrays, an items table, and a meta.

Layout of a store directory::

    meta.json                 what produced the features (model + weights hash, layers,
                              pooling, post-processing, size policy, dims, version, dates)
    plan.parquet              every input in processing order: id, path, shard
    shards/000007.items.parquet   the items of shard 7 (the commit marker, written last)
    shards/000007.<feature>.npy   its features, one file per feature (layer), rows = ok items
    items.parquet             all committed items, consolidated at the end of each run
    post.npz / post.json      the fitted post-processing chain, when it needs fitting
    removed.parquet           removed items (id, path, reason, time): readers leave them out
    compact.json              the journal of a compaction in progress (briefly)

Items table columns: ``id`` (stable row id), ``path``, ``status`` (``ok``/``error``),
``error``, ``width``, ``height`` (original, after EXIF orientation), ``shard``,
``offset`` (row in the shard's arrays, -1 for errors), ``notes``, and the file the item
was made from, taken from the read that was decoded: ``size``, ``mtime_ns``, ``sha256``
(null where the file could not be read; absent from stores written before they were
recorded, read as null). ``meta.json`` records the ``inputs`` (folders, files, globs,
``@lists``, spelled like item paths) every run was given, for ``deepfeat sync``.

Features are stored as pooled (before post-processing); the post-processing chain
recorded in ``meta.json`` is applied when vectors are read (:meth:`FeatureStore.vectors`),
so a different chain never requires re-extraction. Every write is atomic (temporary
file + ``os.replace``) and a shard is committed by its items file, written after its
arrays: after a crash a shard is either fully present or absent.

The package: :mod:`deepfeat.store.featurestore` (:class:`FeatureStore`, the store
directory), :mod:`deepfeat.store.items` (the items and plan tables, :class:`ShardItems`),
:mod:`deepfeat.store.atomic` (the atomic, durable writes every file goes through),
:mod:`deepfeat.store.export` (npz, h5, pkl, csv exports), and removal:
:mod:`deepfeat.store.tombstones` (the files), :mod:`deepfeat.store.removal`
(:func:`~deepfeat.store.removal.remove_items`) and :mod:`deepfeat.store.compaction`.
"""

from __future__ import annotations

from deepfeat.store.atomic import atomic_save_npy, atomic_write_bytes, atomic_write_json, atomic_write_parquet
from deepfeat.store.compat import IDENTITY_KEYS
from deepfeat.store.export import EXPORT_FORMATS, export_store
from deepfeat.store.featurestore import FeatureStore, check_store_dir
from deepfeat.store.items import ITEM_SCHEMA, PLAN_SCHEMA, ShardItems, feature_file_key

__all__ = [
    "EXPORT_FORMATS", "IDENTITY_KEYS", "ITEM_SCHEMA", "PLAN_SCHEMA", "FeatureStore", "ShardItems",
    "atomic_save_npy", "atomic_write_bytes", "atomic_write_json", "atomic_write_parquet", "check_store_dir",
    "export_store", "feature_file_key",
]
