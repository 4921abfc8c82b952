"""The on-disk feature store (see :mod:`deepfeat.store.featurestore`)."""

from .featurestore import (  # noqa: F401
    EXPORT_FORMATS,
    IDENTITY_KEYS,
    ITEM_SCHEMA,
    PLAN_SCHEMA,
    FeatureStore,
    ShardItems,
    _fsync_dir,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    check_store_dir,
    export_store,
    feature_file_key,
    log,
)
