"""What a store must be to answer a query: the checks every reader runs, cheap at any size.

* on open (:func:`check_meta`): ``meta.json`` is an object in this deepfeat's format (a store
  from a newer deepfeat is refused), unedited (its own recorded sha256, ``meta_sha256``) and
  with the fields readers use of the right types;
* on the first read of the items (:func:`check_structure`): every file recorded in the meta
  exists with its recorded size (one ``stat`` each), no recorded shard lost its commit marker,
  and ``items.parquet`` covers exactly the committed shards;
* on each shard's read (:func:`check_shard_rows`, :func:`nonfinite_problem`): the array's rows
  and columns are the shard's ok items and the store's dims, and every value is finite.

The content of each file is checked on read by its sampled digest
(:func:`deepfeat.store.checksums.quick_problem`), fully by ``deepfeat info --verify``. What each
costs on a million-vector store: docs/reliability.md ("What is verified when").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat import __version__
from deepfeat.errors import StoreError
from deepfeat.store.atomic import atomic_write_json
from deepfeat.store.checksums import META_DIGEST_KEY, SECTIONS_DIR, meta_digest, meta_problem, size_problem

#: the store format this deepfeat writes and reads (meta.json's ``format_version``)
STORE_VERSION = 1


def check_store_dir(p: Path) -> None:
    """Refuse a store path that is a file, or a non-empty folder that is not a store (its
    writer's lock file aside)."""
    from deepfeat.store.lock import LOCK_NAME

    if p.exists() and not p.is_dir():
        raise StoreError(f"{p} exists and is not a directory")
    if p.is_dir() and not (p / "meta.json").is_file() and any(f.name != LOCK_NAME for f in p.iterdir()):
        raise StoreError(f"{p} is a non-empty directory that is not a feature store; choose another -o")


def store_summary(store) -> dict[str, Any]:
    """A store (a :class:`~deepfeat.store.FeatureStore`) in numbers: items, features, failures,
    removed items and the rows a compaction would reclaim, shards, and what made the vectors."""
    t = store.items()
    n_err = store.failed().num_rows
    every = store.committed_items()
    reclaimable = every.num_rows - t.num_rows
    return {
        "path": str(store.path),
        "items": t.num_rows,
        "features": t.num_rows - n_err,
        "failed": n_err,
        "removed": len(store.removed_ids()),
        "reclaimable": reclaimable,
        "shards": len(store.committed_shards()),
        "model": store.meta.get("model", {}).get("spec"),
        "layers": store.meta.get("layers"),
        "pooling": store.meta.get("pooling"),
        "post": store.meta.get("post"),
        "size": store.meta.get("size"),
        "dims": {k: v["dim"] for k, v in store.meta.get("features", {}).items()},
    }


def verify_hint(store_path: Path) -> str:
    return f"`deepfeat info {store_path} --verify` lists every damaged file"


def check_meta(meta: Any, meta_path: Path, digest: bool = True) -> None:
    """Refuse a meta that deepfeat did not write as it is (see the module docstring)."""
    if not isinstance(meta, dict):
        raise StoreError(f"{meta_path} is not a deepfeat store meta (it holds a JSON {type(meta).__name__}, "
                         "not an object); restore it from a copy or extract the store again")
    if meta.get("format") != "deepfeat-store":
        raise StoreError(f"{meta_path} is not a deepfeat store meta (format={meta.get('format')!r})")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise StoreError(f"{meta_path}: format_version {version!r} is not a whole number; the file is damaged")
    if version > STORE_VERSION:
        raise StoreError(f"{meta_path} has store format version {version}; this deepfeat ({__version__}) reads up "
                         f"to {STORE_VERSION}: upgrade deepfeat")
    problem = meta_problem(meta, meta_path) if digest else None
    if problem:
        raise StoreError(f"{problem}. Undo the edit (a copy, or the backup you made), or extract the store again; "
                         f"{verify_hint(meta_path.parent)}")
    _check_fields(meta, meta_path)


def _check_fields(meta: dict[str, Any], meta_path: Path) -> None:
    """The fields every reader indexes into, with their types (a damaged meta is named, not a KeyError)."""
    features = meta.get("features", {})
    if not isinstance(features, dict):
        raise StoreError(f"{meta_path}: 'features' must be an object of feature name -> {{'dim': N}}, "
                         f"not {type(features).__name__}; the file is damaged")
    for name, f in features.items():
        dim = f.get("dim") if isinstance(f, dict) else None
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise StoreError(f"{meta_path}: feature {name!r} has dim {dim!r}, not a positive whole number; "
                             "the file is damaged")
    model = meta.get("model", {})
    if not isinstance(model, dict):
        raise StoreError(f"{meta_path}: 'model' must be an object, not {type(model).__name__}; the file is damaged")
    for key in ("layers",):
        if key in meta and not isinstance(meta[key], list):
            raise StoreError(f"{meta_path}: {key!r} must be a list, not {type(meta[key]).__name__}; "
                             "the file is damaged")


def check_structure(store_path: Path, recorded: dict[str, dict[str, Any]], committed: list[int],
                    consolidated_shards: set[int] | None) -> None:
    """Every recorded file is there with its size; no recorded shard lost its commit marker; the
    consolidated items cover exactly the committed shards (*consolidated_shards*; None: no table)."""
    for rel, record in sorted(recorded.items()):
        if rel.startswith(SECTIONS_DIR):
            continue  # a local-feature section's file: checked when its section reads it
        path = store_path / rel
        if rel.startswith("shards/") and rel.endswith(".items.parquet") and not path.is_file():
            shard = int(Path(rel).name.split(".")[0])
            raise StoreError(
                f"{path} is missing: it is the commit marker of shard {shard}, without which that shard's items "
                f"would be left out and every later row's path shifted. Run `deepfeat extract --resume -o "
                f"{store_path}` to extract shard {shard} again; {verify_hint(store_path)}")
        msg = size_problem(path, record)
        # items.parquet: a cache read around; plan.parquet: the writer's; removed.parquet: checked when read
        if msg and rel not in ("items.parquet", "plan.parquet", "removed.parquet"):
            raise StoreError(f"{msg}; {_repair(store_path, rel)}")
    if consolidated_shards is not None and not consolidated_shards <= set(committed):
        lost = sorted(consolidated_shards - set(committed))
        raise StoreError(
            f"{store_path}/items.parquet lists shard(s) {lost} whose commit marker (shards/NNNNNN.items.parquet) "
            f"is missing. Run `deepfeat extract --resume -o {store_path}` to extract them again; "
            f"{verify_hint(store_path)}")


def _repair(store_path: Path, rel: str) -> str:
    if rel.startswith("shards/"):
        shard = int(Path(rel).name.split(".")[0])
        return (f"delete {store_path}/shards/{shard:06d}.items.parquet and run `deepfeat extract --resume -o "
                f"{store_path}` to extract shard {shard} again; {verify_hint(store_path)}")
    if rel == "post.npz":
        return f"fit it again with `deepfeat postprocess {store_path} ...`; {verify_hint(store_path)}"
    return verify_hint(store_path)


def check_shard_rows(store_path: Path, f: Path, shard: int, arr: np.ndarray, n_ok: int, dim: int) -> None:
    """A shard's array has one row per ok item of the shard and the store's dims."""
    if arr.ndim != 2 or arr.shape != (n_ok, dim):
        raise StoreError(f"{f} has shape {arr.shape}, but shard {shard} has {n_ok} ok items of {dim} dims; "
                         f"{_repair(store_path, f'shards/{f.name}')}")


def nonfinite_problem(f: Path, arr: np.ndarray, paths: Callable[[], list[str]]) -> str | None:
    """Why *arr* (the rows of file *f*, whose items' paths *paths()* returns) cannot be searched: its
    first row holding NaN or infinity, named with its image; None if every value is finite."""
    if arr.dtype == np.float32 and arr.ndim == 2:  # NaN and inf survive a product with ones (BLAS, one pass)
        if np.isfinite(arr @ np.ones(arr.shape[1], np.float32)).all():
            return None
    elif np.isfinite(arr).all():
        return None
    bad = np.nonzero(~np.isfinite(np.asarray(arr, np.float64)).all(axis=1))[0]
    if not len(bad):  # finite rows whose sum overflowed float32
        return None
    r = int(bad[0])
    names = paths()
    who = names[r] if r < len(names) else "?"
    return (f"{f} row {r} ({who}) holds NaN or infinity ({len(bad)} such row(s) in this file): such a vector "
            "matches nothing and breaks the search")


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write a store meta with its own record (:data:`~deepfeat.store.checksums.META_DIGEST_KEY`)."""
    meta[META_DIGEST_KEY] = meta_digest(meta)
    atomic_write_json(path, meta)


def ok_per_shard(ok_items) -> dict[int, int]:
    """Ok items per shard, from the items table of the ok items (a pyarrow table)."""
    shards, counts = np.unique(ok_items.column("shard").to_numpy(), return_counts=True)
    return {int(s): int(c) for s, c in zip(shards, counts)}


def shard_paths(ok_items, shard: int) -> list[str]:
    """The paths of a shard's ok items in the order of its array's rows."""
    import pyarrow.compute as pc

    return ok_items.filter(pc.equal(ok_items.column("shard"), shard)).sort_by("offset").column("path").to_pylist()
