"""The :class:`FeatureStore`: a store directory (layout: :mod:`deepfeat.store`), created,
appended to shard by shard, checked and read.

A shard is committed by its items file, written after its arrays; the consolidated
``items.parquet`` is a cache of the shards' items; the post-processing chain in
``meta.json`` is applied when vectors are read.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deepfeat import __version__
from deepfeat.errors import StoreError, UsageError
from deepfeat.store.atomic import _fsync_dir, atomic_save_npy, atomic_write_parquet
from deepfeat.store.checksums import (ALGORITHM, SECTIONS_DIR, SHARD_KEY, SIDE_FILES, content_problem, file_digest,
                                      quick_problem, shard_records, size_problem)
from deepfeat.store.compat import check_compatible
from deepfeat.store.integrity import (STORE_VERSION, check_meta, check_shard_rows, check_store_dir, check_structure,
                                      nonfinite_problem, ok_per_shard, shard_paths, verify_hint, write_meta)
from deepfeat.store.items import ITEM_SCHEMA, PLAN_SCHEMA, ShardItems, feature_file_key
from deepfeat.store.tombstones import (PENDING_KEY, TOMBSTONES, drop_removed, read_journal, read_tombstones,
                                       superseded_shards)

log = logging.getLogger(__name__)


class FeatureStore:
    """A feature store directory (layout: :mod:`deepfeat.store`).

    Open an existing one with ``FeatureStore(path)``; the extraction pipeline creates
    them with :meth:`create`. Reading is memory-mapped and lazy:

    >>> store = FeatureStore("feats")
    >>> len(store), store.dim, store.feature_names
    >>> X = store.vectors()                 # N x D float32, post-processing applied
    >>> store.items()                       # pyarrow table: id, path, status, ...
    >>> store.row_of_path("photos/cat.jpg") # feature row of an image
    """

    def __init__(self, path: str | os.PathLike, check_meta_digest: bool = True):
        """*check_meta_digest* False: open a meta.json edited after deepfeat wrote it (for
        ``deepfeat info --verify``, which reports it; nothing else should)."""
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise StoreError(f"{self.path} is not a feature store (no meta.json); create one with `deepfeat extract`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{meta_path} is unreadable: {e}") from None
        check_meta(meta, meta_path, check_meta_digest)  # an object, this format or older, unedited, fields of the right types
        self.meta: dict[str, Any] = meta
        self._checked = False  # the structure check (deepfeat.store.integrity) runs on the first read
        self._all: pa.Table | None = None  # every committed item, removed ones included
        self._items: pa.Table | None = None  # the same without the removed ones (what readers see)
        self._removed: pa.Table | None = None
        self._post = None

    # -- creation -----------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, meta: dict[str, Any]) -> "FeatureStore":
        """Create an empty store with *meta* (or open it, if one with the same identity exists)."""
        p = Path(path)
        check_store_dir(p)
        if (p / "meta.json").is_file():
            store = cls(p)
            store.check_compatible(meta)
            return store
        (p / "shards").mkdir(parents=True, exist_ok=True)
        full = {
            "format": "deepfeat-store",
            "format_version": STORE_VERSION,
            "deepfeat_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **meta,
        }
        write_meta(p / "meta.json", full)
        _fsync_dir(p)
        return cls(p)

    def check_compatible(self, meta: dict[str, Any]) -> None:
        """Refuse to mix features made differently in one store, naming what differs."""
        check_compatible(self.path, self.meta, meta)

    def update_meta(self, **kw: Any) -> None:
        """Update and write ``meta.json``; the checksums of the side files (post.npz, pooling.npz),
        which deepfeat writes just before it updates the meta, are refreshed with it."""
        self.meta.update(kw)
        self.meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        files = dict(self._recorded())
        for rel in SIDE_FILES:
            if (self.path / rel).is_file():
                files[rel] = file_digest(self.path / rel)
            else:
                files.pop(rel, None)
        if files or "checksums" in self.meta:
            self.meta["checksums"] = {"algorithm": ALGORITHM, "files": files}
        write_meta(self.path / "meta.json", self.meta)

    # -- checksums (deepfeat.store.checksums) ------------------------------------------------

    def _recorded(self) -> dict[str, dict[str, Any]]:
        return (self.meta.get("checksums") or {}).get("files") or {}

    def _check_file(self, path: Path, record: dict[str, Any] | None = None, full: bool = False) -> None:
        """Refuse a file whose size or sampled content differs from what was written
        (:func:`~deepfeat.store.checksums.quick_problem`: a ``stat`` and 64 KiB read), or with
        *full*, whose sha256 differs (for small files read whole anyway)."""
        record = record or self._recorded().get(path.relative_to(self.path).as_posix())
        msg = content_problem(path, record) if full and record and record.get("sha256") else quick_problem(path, record)
        if msg:
            raise StoreError(f"{msg}; {verify_hint(self.path)}")

    def verify(self):
        """Hash and check every file (:func:`deepfeat.store.checksums.verify_store`); a :class:`VerifyReport`."""
        from deepfeat.store.checksums import verify_store

        return verify_store(self)

    # -- plan ---------------------------------------------------------------

    def read_plan(self) -> pa.Table | None:
        p = self.path / "plan.parquet"
        return pq.read_table(p) if p.is_file() else None

    def write_plan(self, ids: Sequence[int], paths: Sequence[str], shards: Sequence[int]) -> None:
        t = pa.table({"id": pa.array(ids, pa.int64()), "path": pa.array(paths, pa.string()),
                      "shard": pa.array(shards, pa.int32())}, schema=PLAN_SCHEMA)
        atomic_write_parquet(self.path / "plan.parquet", t)
        # recorded for `info --verify` (readers never use the plan; a resumed run re-reads it)
        self.update_meta(checksums={"algorithm": ALGORITHM,
                                    "files": {**self._recorded(), "plan.parquet": file_digest(self.path / "plan.parquet")}})

    # -- shards -------------------------------------------------------------

    def _shard_items_path(self, shard: int) -> Path:
        return self.path / "shards" / f"{shard:06d}.items.parquet"

    def shard_feature_path(self, shard: int, name: str) -> Path:
        return self.path / "shards" / f"{shard:06d}.{feature_file_key(name)}.npy"

    def is_committed(self, shard: int) -> bool:
        """Whether *shard* has been committed (its items file, written last, exists)."""
        return self._shard_items_path(shard).is_file()

    def shard_items(self, shard: int) -> pa.Table | None:
        """The items table of a committed shard, or None if it is not committed."""
        p = self._shard_items_path(shard)
        return pq.read_table(p) if p.is_file() else None

    def committed_shards(self) -> list[int]:
        """The committed shards, less those an unfinished compaction already replaced (:mod:`.tombstones`)."""
        out = []
        for f in (self.path / "shards").glob("*.items.parquet"):
            try:
                out.append(int(f.name.split(".")[0]))
            except ValueError:
                continue
        gone = superseded_shards(self.path, read_journal(self.path))
        return sorted(s for s in out if s not in gone)

    def commit_shard(self, shard: int, items: ShardItems, features: dict[str, np.ndarray]) -> None:
        """Write a shard's arrays, then its items file (the commit marker)."""
        n_ok = sum(1 for s in items.status if s == "ok")
        for name, arr in features.items():
            if arr.shape[0] != n_ok:
                raise StoreError(f"shard {shard}: {arr.shape[0]} feature rows for {n_ok} ok items ({name})")
            atomic_save_npy(self.shard_feature_path(shard, name), arr)
        # the arrays' checksums travel in the commit marker itself: committed with the shard, atomically
        records = {self.shard_feature_path(shard, name).name: file_digest(self.shard_feature_path(shard, name))
                   for name in features}
        table = items.table(shard).replace_schema_metadata({SHARD_KEY: json.dumps(records)})
        atomic_write_parquet(self._shard_items_path(shard), table)
        _fsync_dir(self.path / "shards")
        self.forget()

    def forget(self) -> None:
        """Drop what was read of the items and tombstones (a writer changed them)."""
        self._all = self._items = self._removed = None

    def consolidate(self) -> pa.Table:
        """Write ``items.parquet`` from the committed shards (in shard order) and return it,
        and record the checksums of every shard and of ``items.parquet`` in the meta."""
        t = self._read_shard_items()
        atomic_write_parquet(self.path / "items.parquet", t)
        self.forget()
        self._record_shards()
        return t

    def _record_shards(self) -> None:
        """Checksums into meta.json: each shard's arrays (copied from its commit marker), each shard
        items file (hashed once: a committed shard is never rewritten), ``items.parquet`` (hashed)."""
        old = self._recorded()
        files = {k: v for k, v in old.items() if k in (*SIDE_FILES, "plan.parquet")
                 or (k.startswith(SECTIONS_DIR) and (self.path / k).is_file())}  # local-feature sections
        for s in self.committed_shards():
            items_file = self._shard_items_path(s)
            rel = f"shards/{items_file.name}"
            kept = old.get(rel) is not None and quick_problem(items_file, old[rel]) is None
            files[rel] = old[rel] if kept else file_digest(items_file)  # a shard extracted again is hashed again
            for name, rec in (shard_records(items_file) or {}).items():
                files[f"shards/{name}"] = rec
        files["items.parquet"] = file_digest(self.path / "items.parquet")
        self.meta["checksums"] = {"algorithm": ALGORITHM, "files": files}
        self.update_meta()

    def _read_shard_items(self) -> pa.Table:
        shards = self.committed_shards()
        if not shards:
            return ITEM_SCHEMA.empty_table()
        for s in shards:  # when they answer (no usable items.parquet), each as it was written
            self._check_file(self._shard_items_path(s))
        t = pa.concat_tables([pq.read_table(self._shard_items_path(s)) for s in shards], promote_options="default")
        return t.replace_schema_metadata(None)  # the per-shard checksums stay in the shard files

    # -- reading ------------------------------------------------------------

    @property
    def feature_names(self) -> list[str]:
        return list(self.meta.get("features", {}))

    def feature_name(self, name: str | None = None) -> str:
        names = self.feature_names
        if not names:
            raise StoreError(f"{self.path} has no features recorded in its meta")
        if name is None:
            return names[0]
        if name not in names:
            raise UsageError(f"feature {name!r} not in store; it has: {', '.join(names)}")
        return name

    @property
    def dim(self) -> int:
        return int(self.meta["features"][self.feature_name()]["dim"])

    def items(self, refresh: bool = False) -> pa.Table:
        """All committed items (ok and failed) but the removed ones, in row-id order of processing."""
        if self._items is None or refresh:
            self._items = drop_removed(self.committed_items(refresh), self.removed_ids(refresh))
        return self._items

    def committed_items(self, refresh: bool = False) -> pa.Table:
        """All committed items, the removed ones included (what the shards' arrays hold)."""
        if self._all is None or refresh:
            consolidated = self.path / "items.parquet"
            shards = self.committed_shards()
            t = None
            stale = size_problem(consolidated, self._recorded().get("items.parquet"))
            if stale and consolidated.is_file():  # a cache of the shards' items: read them instead
                log.warning("%s; reading the items from the shards instead", stale)
            if consolidated.is_file() and not stale:
                stale = quick_problem(consolidated, self._recorded().get("items.parquet"))
                if stale:
                    log.warning("%s; reading the items from the shards instead", stale)
            covered = None
            if consolidated.is_file() and not stale and not (self.path / "compact.json").is_file():
                t = pq.read_table(consolidated)
                covered = set(t.column("shard").to_pylist()) if t.num_rows else set()
                if not set(shards) <= covered and shards:
                    t = None  # stale: shards were committed after the last consolidation
            if not self._checked:
                check_structure(self.path, self._recorded(), shards, covered)
                self._checked = True
            self._all = t if t is not None else self._read_shard_items()
        return self._all

    def tombstones(self, refresh: bool = False) -> pa.Table:
        """The removed items (``removed.parquet``: id, path, reason, time; :mod:`deepfeat.store.tombstones`)."""
        if self._removed is None or refresh:
            self._removed = read_tombstones(self.path, self._recorded().get(TOMBSTONES), self.meta.get(PENDING_KEY))
        return self._removed

    def removed_ids(self, refresh: bool = False) -> np.ndarray:
        """The ids of the removed items (sorted int64): readers leave them out."""
        return np.unique(self.tombstones(refresh).column("id").to_numpy().astype(np.int64, copy=False))

    def ok_items(self) -> pa.Table:
        """The items that have a feature row, in feature-row order."""
        t = self.items()
        return t.filter(pc.equal(t.column("status"), "ok"))

    def __len__(self) -> int:
        """Number of feature rows (successfully processed images)."""
        return self.ok_items().num_rows

    @property
    def ids(self) -> np.ndarray:
        return self.ok_items().column("id").to_numpy()

    @property
    def paths(self) -> list[str]:
        return self.ok_items().column("path").to_pylist()

    def features(self, name: str | None = None, mmap: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        """(shard, array) pairs of the stored (pooled, not post-processed) features: the rows of
        the items not removed (a shard without removed rows is the memory-mapped file itself)."""
        name = self.feature_name(name)
        dim = int(self.meta["features"][name]["dim"])
        every = self.committed_items()
        ok = every.filter(pc.equal(every.column("status"), "ok"))
        n_ok = ok_per_shard(ok)  # the rows each shard's arrays were written with, removed ones included
        removed = np.isin(ok.column("id").to_numpy(), self.removed_ids())
        gone = {int(s): np.asarray(ok.column("offset").to_numpy()[removed & (ok.column("shard").to_numpy() == s)])
                for s in np.unique(ok.column("shard").to_numpy()[removed])}
        for s in self.committed_shards():
            f = self.shard_feature_path(s, name)
            if not f.is_file():
                raise StoreError(f"shard {s} is committed but its features {f.name} are missing; "
                                 f"{verify_hint(self.path)}")
            self._check_file(f, self._array_record(s, f))
            try:
                arr = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
            except ValueError as e:  # a damaged header, or fewer bytes than it declares
                raise StoreError(f"{f} is damaged ({e}); {verify_hint(self.path)}") from None
            check_shard_rows(self.path, f, s, arr, n_ok.get(s, 0), dim)
            yield s, (np.delete(arr, gone[s], axis=0) if s in gone else arr)

    def _array_record(self, shard: int, f: Path) -> dict[str, Any] | None:
        """A shard array's record: in meta.json after consolidation, else in its commit marker."""
        rec = self._recorded().get(f"shards/{f.name}")
        if rec is None and self.is_committed(shard):
            rec = (shard_records(self._shard_items_path(shard)) or {}).get(f.name)
        return rec

    def raw(self, name: str | None = None) -> np.ndarray:
        """All stored features of *name* as one N x D float32 array (row = feature row)."""
        parts = []
        for s, a in self.features(name):
            problem = nonfinite_problem(self.shard_feature_path(s, self.feature_name(name)), a,
                                        lambda s=s: shard_paths(self.ok_items(), s))  # paths when needed
            if problem:
                raise StoreError(f"{problem}. Extract the shard again: delete {self._shard_items_path(s)} and run "
                                 f"`deepfeat extract --resume -o {self.path}`")
            parts.append(a)
        if not parts:
            return np.zeros((0, self.meta["features"][self.feature_name(name)]["dim"]), np.float32)
        return np.ascontiguousarray(np.concatenate(parts).astype(np.float32, copy=False))

    @property
    def post(self):
        """The post-processing chain of this store (fitted if it needs fitting), or None."""
        if self._post is None:
            spec = self.meta.get("post") or "none"
            from deepfeat.postprocess import PostChain

            fitted = self.path / "post.npz"
            if fitted.is_file():
                self._check_file(fitted, full=True)  # small, and read whole: every byte checked
                try:
                    self._post = PostChain.load(fitted)
                except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                    raise StoreError(f"{fitted} is damaged ({type(e).__name__}: {e}); fit it again with "
                                     f"`deepfeat postprocess {self.path} ...`") from None
            else:
                self._post = PostChain.parse(spec)
        return self._post

    def vectors(self, name: str | None = None, post: bool = True) -> np.ndarray:
        """N x D float32 descriptors ready for search: stored features + post-processing."""
        x = self.raw(name)
        if not post:
            return x
        chain = self.post
        if not chain.fitted:
            raise StoreError(f"{self.path}: post-processing {chain.spec!r} is not fitted yet; run `deepfeat postprocess`")
        return np.ascontiguousarray(chain.apply(x), dtype=np.float32)

    def resolve_path(self, path: str) -> str:
        """The file of a stored item path: relative paths are relative to the folder the
        extraction ran in (``meta["root"]``), so they work from any working directory
        (falling back to the working directory when the root is gone, e.g. a moved store)."""
        if os.path.isabs(path):
            return path
        root = self.meta.get("root")
        if root:
            cand = os.path.normpath(os.path.join(root, path))
            if os.path.exists(cand) or not os.path.exists(path):
                return cand
        return path

    def row_of_path(self, path: str) -> int:
        """Feature row of an image path (as stored, or normalised)."""
        paths = self.paths
        for cand in (path, os.path.normpath(path)):
            try:
                return paths.index(cand)
            except ValueError:
                continue
        raise UsageError(f"{path} is not in the store (or failed to extract)")

    def row_of_id(self, item_id: int) -> int:
        ids = self.ids
        hit = np.nonzero(ids == int(item_id))[0]
        if not len(hit):
            raise UsageError(f"id {item_id} is not in the store (or failed to extract)")
        return int(hit[0])

    def failed(self) -> pa.Table:
        t = self.items()
        return t.filter(pc.equal(t.column("status"), "error"))

    def summary(self) -> dict[str, Any]:
        """What ``deepfeat info`` prints (:func:`deepfeat.store.integrity.store_summary`)."""
        from deepfeat.store.integrity import store_summary

        return store_summary(self)
