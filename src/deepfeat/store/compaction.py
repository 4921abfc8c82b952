"""Compaction: the shards that hold removed rows rewritten without them (under new shard
numbers), the old files and the reclaimed tombstones deleted; crash-safe through a journal.

The steps (each named to *on_step* as it is done, for fault injection), and why a ``kill -9``
after any of them leaves a store that reads the same (each item once, same id, path and vector):

1. ``journal``: ``compact.json`` names each old shard and its new number (None when every row
   is removed). Nothing else changed yet.
2. ``shard`` (once per new shard): the kept rows of an old shard are committed as the new
   shard (arrays, then the items file: :meth:`FeatureStore.commit_shard`). From its commit on,
   readers leave the old shard out (:func:`~deepfeat.store.tombstones.superseded_shards`).
3. ``switched``: the journal says every new shard is committed: every old shard is left out.
4. ``plan``: the plan's ids point to their new shards.
5. ``tombstones``: the tombstones of items no shard holds any more are dropped.
6. ``consolidated``: ``items.parquet`` and the meta's checksums describe the new shards only.
7. ``deleted``: each old shard's commit marker, then its arrays, are deleted.
8. the journal is deleted.

The next writer (``deepfeat remove``, ``deepfeat extract``) finishes a leftover journal
(:func:`finish_compaction`): every step is idempotent, and the old files are deleted only
once their rows are safe in the new shards, so finishing is always possible.
Rows move: a new shard comes after every old one, so a compacted shard's rows are read last;
a saved index is brought up to date by :func:`deepfeat.index.update.refresh_index`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from deepfeat.store.atomic import _fsync_dir, atomic_write_json
from deepfeat.store.featurestore import FeatureStore
from deepfeat.store.items import ShardItems
from deepfeat.store.removal import Step, _no_step, allocation_floor, raise_high_water, write_tombstones
from deepfeat.store.tombstones import JOURNAL, read_journal


def compaction_plan(store: FeatureStore) -> dict[int, int | None]:
    """Old shard -> new shard number (None: every row removed) for each shard holding removed items."""
    removed = store.removed_ids(refresh=True)
    every = store.committed_items(refresh=True)
    if not len(removed) or not every.num_rows:
        return {}
    ids = every.column("id").to_numpy()
    shard = every.column("shard").to_numpy()
    hit = np.isin(ids, removed)
    plan = store.read_plan()
    _, next_shard = allocation_floor(store, (), plan.column("shard").to_pylist() if plan is not None else ())
    moves: dict[int, int | None] = {}
    for s in sorted(int(x) for x in np.unique(shard[hit])):
        if (hit | (shard != s)).all():
            moves[s] = None
        else:
            moves[s] = next_shard
            next_shard += 1
    return moves


def compact_store(store: FeatureStore, on_step: Step | None = None) -> dict[str, Any]:
    """Compact *store* (see the module docstring); a leftover journal is finished first.
    Returns ``{"shards": {old: new}, "rows_reclaimed", "bytes_reclaimed"}``."""
    store = FeatureStore(store.path)
    step = on_step or _no_step
    journal = read_journal(store.path)
    if journal is not None:
        done = finish_compaction(store, step)
        store = FeatureStore(store.path)
    else:
        done = None
    moves = compaction_plan(store)
    if not moves:
        return done or {"shards": {}, "rows_reclaimed": 0, "bytes_reclaimed": 0}
    raise_high_water(store, shards=max((t for t in moves.values() if t is not None), default=-1))
    store.update_meta(compactions=int(store.meta.get("compactions") or 0) + 1)  # rows move: see index.update
    atomic_write_json(store.path / JOURNAL, {"moves": {str(k): v for k, v in moves.items()}, "switched": False})
    _fsync_dir(store.path)
    step("journal")
    return finish_compaction(FeatureStore(store.path), step)


def finish_compaction(store: FeatureStore, on_step: Step | None = None) -> dict[str, Any]:
    """Carry out (or finish, after a crash) the compaction its journal describes; steps 2-8."""
    step = on_step or _no_step
    journal = read_journal(store.path)
    if journal is None:
        return {"shards": {}, "rows_reclaimed": 0, "bytes_reclaimed": 0}
    moves = journal["moves"]
    before = _bytes(store, moves)
    rows = 0
    if not journal["switched"]:
        removed = store.removed_ids(refresh=True)
        for old, new in moves.items():
            if new is not None and not store.is_committed(new) and store.is_committed(old):
                rows += _rewrite(store, old, new, removed)
                step("shard")
        atomic_write_json(store.path / JOURNAL, {"moves": {str(k): v for k, v in moves.items()}, "switched": True})
        step("switched")
    store = FeatureStore(store.path)
    _repoint_plan(store)
    step("plan")
    _reclaim_tombstones(store, step)
    store = FeatureStore(store.path)
    store.consolidate()
    step("consolidated")
    for old in moves:
        _delete_shard(store, old)
    step("deleted")
    (store.path / JOURNAL).unlink(missing_ok=True)
    _fsync_dir(store.path)
    return {"shards": {int(k): v for k, v in moves.items()}, "rows_reclaimed": rows,
            "bytes_reclaimed": max(0, before - _bytes(store, {t: None for t in moves.values() if t is not None}))}


def _rewrite(store: FeatureStore, old: int, new: int, removed: np.ndarray) -> int:
    """Commit the kept items of shard *old* as shard *new*; returns the feature rows left behind."""
    t = store.shard_items(old)
    keep = ~np.isin(t.column("id").to_numpy(), removed)
    kept = t.filter(pa.array(keep))
    ok = np.array([s == "ok" for s in kept.column("status").to_pylist()], bool)
    offsets = kept.column("offset").to_numpy()
    items = ShardItems.empty()
    cols = {c: kept.column(c).to_pylist() for c in ("id", "path", "error", "width", "height", "notes")}
    for j in range(kept.num_rows):
        items.add(cols["id"][j], cols["path"][j], ok=bool(ok[j]), error=cols["error"][j], width=cols["width"][j],
                  height=cols["height"][j], offset=int(ok[:j].sum()) if ok[j] else -1,
                  notes=cols["notes"][j].split(",") if cols["notes"][j] else ())
    features = {}
    for name in store.feature_names:
        arr = np.load(store.shard_feature_path(old, name), mmap_mode="r", allow_pickle=False)
        features[name] = np.ascontiguousarray(arr[offsets[ok]])
    store.commit_shard(new, items, features)
    n_ok_old = int(pc.sum(pc.equal(t.column("status"), "ok")).as_py() or 0)
    return n_ok_old - int(ok.sum())


def _repoint_plan(store: FeatureStore) -> None:
    """The plan without removed ids, and each id of a committed item in its shard now."""
    plan = store.read_plan()
    if plan is None:
        return
    every = store.committed_items(refresh=True)
    where = dict(zip(every.column("id").to_pylist(), every.column("shard").to_pylist()))
    removed = set(store.removed_ids().tolist())
    ids, paths, shards = [], [], []
    for i, p, s in zip(plan.column("id").to_pylist(), plan.column("path").to_pylist(), plan.column("shard").to_pylist()):
        if i in removed:
            continue
        ids.append(i)
        paths.append(p)
        shards.append(where.get(i, s))
    if shards != plan.column("shard").to_pylist() or len(ids) != plan.num_rows:
        store.write_plan(ids, paths, shards)


def _reclaim_tombstones(store: FeatureStore, step: Step) -> None:
    """Drop the tombstones of items no committed shard holds any more."""
    t = store.tombstones(refresh=True)
    held = np.isin(t.column("id").to_numpy(), store.committed_items(refresh=True).column("id").to_numpy())
    if not held.all():
        write_tombstones(store, t.filter(pa.array(held)), step)


def _delete_shard(store: FeatureStore, shard: int) -> None:
    """An old shard's commit marker first (it stops being a shard), then its arrays."""
    marker = store.path / "shards" / f"{shard:06d}.items.parquet"
    marker.unlink(missing_ok=True)
    _fsync_dir(store.path / "shards")
    for name in store.feature_names:
        store.shard_feature_path(shard, name).unlink(missing_ok=True)


def _bytes(store: FeatureStore, moves: dict[int, Any]) -> int:
    total = 0
    for s in moves:
        for f in [store.path / "shards" / f"{s:06d}.items.parquet",
                  *(store.shard_feature_path(s, n) for n in store.feature_names)]:
            total += f.stat().st_size if f.is_file() else 0
    return total
