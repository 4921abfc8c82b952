"""A collection that changes: the store brought in line with its folders in one call, its saved
index included.

:func:`sync_store` is ``deepfeat extract FOLDER -o STORE --sync`` and ``deepfeat sync STORE``:
the extraction with a sync (:mod:`deepfeat.pipeline.sync`: new files added, changed ones
extracted again, deleted ones removed), then, under the same writer lock, the store's saved
index refreshed (:func:`deepfeat.index.update.refresh_index`: updated in place where its kind
allows, rebuilt otherwise). :func:`preview_sync` is ``--dry-run``: the diff, nothing changed.
"""

from __future__ import annotations

from deepfeat.errors import UsageError
from deepfeat.index.update import INDEX_DIR, refresh_index
from deepfeat.pipeline import ExtractConfig, ExtractReport, extract
from deepfeat.pipeline.sync import SyncPlan, recorded_inputs, scan_inputs
from deepfeat.store import FeatureStore


def refresh_saved_index(store: FeatureStore) -> str | None:
    """Bring the store's saved index (if it has one, or a refresh of it was interrupted) in line
    with its items; one line saying how, None without an index."""
    if not any((store.path / name).exists() for name in (INDEX_DIR, f"{INDEX_DIR}.new")):
        return None
    return refresh_index(store)


def sync_store(cfg: ExtractConfig) -> ExtractReport:
    """Sync ``cfg.output`` with ``cfg.inputs`` (or, without inputs, with the folders the store
    records) and refresh its index; the report's ``sync`` has the counts, ``sync_paths`` the paths."""
    cfg.sync = True
    return extract(cfg, after=refresh_saved_index)


def preview_sync(store_path: str, inputs: list[str] | None = None, cache: bool = False) -> SyncPlan:
    """What a sync of *store_path* would do, changing nothing in the store (``--dry-run``); *cache*: with
    the file-hash cache of the user cache folder (:mod:`deepfeat.pipeline.hashcache`)."""
    store = FeatureStore(store_path)
    inputs = list(inputs or []) or recorded_inputs(store)
    if not inputs:
        raise UsageError(f"{store_path} does not record the folders it was made from (it was extracted before "
                         f"deepfeat recorded them); give them: `deepfeat extract FOLDER... -o {store_path} --sync`")
    from deepfeat.pipeline.hashcache import hash_cache

    with hash_cache(cache) as hashes:
        return scan_inputs(store, inputs, hashes=hashes)
