"""Removing items from a store: tombstones written atomically, then the plan; no committed
shard is rewritten (that is :mod:`deepfeat.store.compaction`'s job).

Order of the writes, so that a ``kill -9`` at any point leaves a store every reader opens
(the files: :mod:`deepfeat.store.tombstones`):

1. the new tombstones file is written beside the old one (``.removed.parquet.next``) and
   fsynced; its record goes into ``meta.json`` as *pending*;
2. it is renamed over ``removed.parquet``: from here on every reader leaves the items out;
3. the meta records it in place of the pending record;
4. the removed ids leave ``plan.parquet``, so the same path extracted again is a new item
   (a new id in a new shard). A plan that still lists them is harmless: :func:`allocation_floor`
   and the next removal or compaction work from the tombstones.

Each removal is idempotent: ids already removed are not counted again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deepfeat.errors import UsageError
from deepfeat.store.atomic import _fsync_dir
from deepfeat.store.checksums import file_digest, quick_problem, store_fingerprint
from deepfeat.store.featurestore import FeatureStore
from deepfeat.store.tombstones import PENDING_KEY, TOMBSTONES, read_journal, tombstone_table

#: called with the name of each step of a removal or compaction as it is done (fault injection, tests)
Step = Callable[[str], None]


def _no_step(name: str) -> None:
    return None


def remove_items(store: FeatureStore, ids: Sequence[int], reason: str, on_step: Step | None = None) -> int:
    """Mark committed items (by item id) as removed, atomically and idempotently; returns how many were newly removed.
    Also drops them from plan.parquet, so the same path extracted again gets a NEW id (a new item in a new shard).

    An id that is not a committed item of the store is refused (:class:`UsageError`), nothing removed."""
    step = on_step or _no_step
    want = np.unique(np.asarray(list(ids), dtype=np.int64))
    every = store.committed_items(refresh=True)
    known = every.column("id").to_numpy()
    unknown = want[~np.isin(want, known)]
    if len(unknown):
        shown = ", ".join(str(int(i)) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UsageError(f"{len(unknown)} id(s) are not items of {store.path}: {shown}; nothing was removed")
    old = store.tombstones(refresh=True)
    new = want[~np.isin(want, old.column("id").to_numpy())]
    if len(new):
        rows = every.filter(pa.array(np.isin(known, new)))
        add = tombstone_table(rows.column("id").to_pylist(), rows.column("path").to_pylist(),
                              [reason] * rows.num_rows)
        write_tombstones(store, pa.concat_tables([old.select(add.schema.names).cast(add.schema), add]), step)
    raise_high_water(store, ids=int(known.max()) if len(known) else -1)
    drop_from_plan(store)
    step("plan")
    store.forget()
    return len(new)


def write_tombstones(store: FeatureStore, table: pa.Table, step: Step = _no_step) -> None:
    """Replace ``removed.parquet`` by *table*, in the order of the module docstring."""
    final = store.path / TOMBSTONES
    tmp = store.path / f".{TOMBSTONES}.next"
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    store.update_meta(**{PENDING_KEY: file_digest(tmp)})
    step("pending")
    os.replace(tmp, final)
    _fsync_dir(store.path)
    step("tombstones")
    store.meta.pop(PENDING_KEY, None)
    store.update_meta()  # records removed.parquet as it is now (update_meta refreshes the side files)
    store.forget()


def drop_from_plan(store: FeatureStore) -> None:
    """Rewrite ``plan.parquet`` without the removed ids (nothing when it holds none of them)."""
    plan = store.read_plan()
    removed = store.removed_ids(refresh=True)
    if plan is None or not len(removed):
        return
    keep = ~np.isin(plan.column("id").to_numpy(), removed)
    if keep.all():
        return
    kept = plan.filter(pa.array(keep))
    store.write_plan(kept.column("id").to_pylist(), kept.column("path").to_pylist(), kept.column("shard").to_pylist())


def raise_high_water(store: FeatureStore, ids: int = -1, shards: int = -1) -> None:
    """Record in the meta the largest item id and shard number ever used, so that a removal
    or compaction never lets a new item take the id (or a new shard the number) of an old one."""
    have = dict(store.meta.get("high_water") or {"id": -1, "shard": -1})
    new = {"id": max(int(have.get("id", -1)), ids), "shard": max(int(have.get("shard", -1)), shards,
                                                                   max(store.committed_shards(), default=-1))}
    if new != have:
        store.update_meta(high_water=new)


def allocation_floor(store: FeatureStore, plan_ids: Sequence[int] = (), plan_shards: Sequence[int] = ()
                     ) -> tuple[int, int]:
    """(first free item id, first free shard number) of *store* given its plan's columns: above
    every id and shard the plan, the shards, the tombstones, a compaction and the meta's
    high-water mark ever used."""
    hw = store.meta.get("high_water") or {}
    removed = store.removed_ids()
    ids = [int(hw.get("id", -1)), max(plan_ids, default=-1), int(removed.max()) if len(removed) else -1]
    journal = read_journal(store.path) or {"moves": {}}
    shards = [int(hw.get("shard", -1)), max(plan_shards, default=-1), max(store.committed_shards(), default=-1),
              *[s for move in journal["moves"].items() for s in move if s is not None]]
    if store.committed_shards():
        every = store.committed_items()
        ids.append(int(every.column("id").to_numpy().max()) if every.num_rows else -1)
    return max(ids) + 1, max(shards) + 1


def vectors_fingerprint(store: FeatureStore) -> str | None:
    """A fingerprint of the vectors as readers see them, in their order: the recorded checksums
    (:func:`~deepfeat.store.checksums.store_fingerprint`), the tombstones a removal has written but
    not yet recorded, and an unfinished compaction's journal. An index records it when built or
    brought up to date; any removal, append or compaction changes it."""
    recorded = dict((store.meta.get("checksums") or {}).get("files") or {})
    pending = store.meta.get(PENDING_KEY)
    if pending and (store.path / TOMBSTONES).is_file() and quick_problem(store.path / TOMBSTONES, pending) is None:
        recorded[TOMBSTONES] = pending
    fp = store_fingerprint(recorded)
    journal = read_journal(store.path)
    if fp is None or journal is None:
        return fp
    state = json.dumps([fp, sorted(journal["moves"].items(), key=lambda m: m[0]), store.committed_shards()],
                       default=str)
    return hashlib.sha256(state.encode()).hexdigest()


def missing_items(store: FeatureStore) -> dict[str, Any]:
    """The items whose files no longer exist (:meth:`FeatureStore.resolve_path`): ``{"ids", "paths"}``."""
    t = store.items()
    ids, paths = [], []
    for i, p in zip(t.column("id").to_pylist(), t.column("path").to_pylist()):
        if not os.path.exists(store.resolve_path(p)):
            ids.append(int(i))
            paths.append(p)
    return {"ids": ids, "paths": paths}


def ids_of_paths(store: FeatureStore, paths: Sequence[str]) -> list[int]:
    """The item ids of *paths* (as stored, or normalised, like :meth:`FeatureStore.row_of_path`, or any
    path of the same file from here), ok or failed items alike; a path whose only item is removed gives
    that item (removing it again changes nothing); a path that is not an item is refused, naming it."""
    by_path: dict[str, int] = {}
    for t in (store.committed_items(), store.items()):  # a live item of a path wins over a removed one
        by_path.update(zip(t.column("path").to_pylist(), (int(i) for i in t.column("id").to_pylist())))
    out, missing = [], []
    by_file: dict[str, int] | None = None
    for p in paths:
        hit = next((by_path[c] for c in (p, os.path.normpath(p)) if c in by_path), None)
        if hit is None:  # another spelling of the same file (relative to the store's root, or absolute)
            if by_file is None:
                by_file = {os.path.realpath(store.resolve_path(q)): i for q, i in reversed(list(by_path.items()))}
            hit = by_file.get(os.path.realpath(p))
        if hit is None:
            missing.append(p)
        else:
            out.append(hit)
    if missing:
        raise UsageError(f"not in {store.path}: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else "") + "; nothing was removed")
    return out
