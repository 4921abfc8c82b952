"""The files that let a store lose items without rewriting a committed shard: the tombstones
(``removed.parquet``) and the compaction journal (``compact.json``), read by every reader.

* ``removed.parquet`` (columns ``id``, ``path``, ``reason``, ``time``): the items removed from
  the store. Readers leave them out of every table and array; the shards that hold them are
  never rewritten by a removal (:func:`deepfeat.store.removal.remove_items`), only by a
  compaction (:mod:`deepfeat.store.compaction`). Written atomically; its record in
  ``meta.json``'s checksums is written in two steps so that a ``kill -9`` between the file and
  the meta leaves a store that opens: the record of the file about to be written is put in the
  meta first, under :data:`PENDING_KEY`, then the file, then the meta again with the record in
  its place. A reader accepts the file when it matches either record.
* ``compact.json``: ``{"moves": {"<old shard>": <new shard or null>, ...}, "switched": bool}``,
  written before a compaction writes its first new shard, rewritten with ``switched`` once
  every new shard is committed, and removed after the last old file is deleted. While it
  exists, an old shard whose new shard is committed (every old shard, once switched) is left
  out by every reader, so each item is read exactly once at every step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deepfeat.errors import StoreError
from deepfeat.store.checksums import quick_problem

TOMBSTONES = "removed.parquet"
JOURNAL = "compact.json"
#: meta key: the record of a tombstones file being written (a removal in progress)
PENDING_KEY = "removed_pending"
SCHEMA = pa.schema([("id", pa.int64()), ("path", pa.string()), ("reason", pa.string()), ("time", pa.string())])


def tombstone_table(ids: Sequence[int], paths: Sequence[str], reasons: Sequence[str],
                    times: Sequence[str] | None = None) -> pa.Table:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return pa.table({"id": pa.array([int(i) for i in ids], pa.int64()), "path": pa.array(list(paths), pa.string()),
                     "reason": pa.array(list(reasons), pa.string()),
                     "time": pa.array(list(times) if times is not None else [now] * len(ids), pa.string())},
                    schema=SCHEMA)


def tombstones_problem(path: Path, record: dict[str, Any] | None, pending: dict[str, Any] | None) -> str | None:
    """Why the tombstones file at *path* is neither the recorded one nor the one a removal was writing."""
    if not path.is_file():
        if record is None:
            return None
        return f"{path} is missing (it lists the removed items; without it they would come back)"
    problem = quick_problem(path, record)
    if problem and pending is not None and quick_problem(path, pending) is None:
        return None  # a removal wrote it and was stopped before it recorded it: it is the newer list
    return problem


def read_tombstones(root: Path, record: dict[str, Any] | None, pending: dict[str, Any] | None) -> pa.Table:
    """The tombstones of the store at *root* (an empty table when nothing was ever removed)."""
    path = root / TOMBSTONES
    problem = tombstones_problem(path, record, pending)
    if problem:
        raise StoreError(f"{problem}; `deepfeat info {root} --verify` lists every damaged file")
    if not path.is_file():
        return SCHEMA.empty_table()
    try:
        t = pq.ParquetFile(path).read()
    except Exception as e:  # noqa: BLE001 -- a damaged parquet fails in many ways
        raise StoreError(f"{path} is unreadable ({type(e).__name__}: {e}); "
                         f"`deepfeat info {root} --verify` lists every damaged file") from None
    if t.schema.names[:2] != ["id", "path"]:
        raise StoreError(f"{path} is not a deepfeat tombstones file (columns {t.schema.names})")
    return t


def read_journal(root: Path) -> dict[str, Any] | None:
    """The journal of an unfinished compaction: ``{"moves": {old shard: new shard or None},
    "switched": bool}`` (None: no compaction in progress)."""
    path = root / JOURNAL
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        moves = {int(k): (None if v is None else int(v)) for k, v in raw["moves"].items()}
        return {"moves": moves, "switched": bool(raw.get("switched"))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise StoreError(f"{path} (the journal of a compaction) is unreadable: {e}; restore the store from a copy")


def superseded_shards(root: Path, journal: dict[str, Any] | None) -> set[int]:
    """The old shards of an unfinished compaction that readers leave out: every one once the
    journal says ``switched`` (all new shards committed), before that those whose new shard is
    committed."""
    if not journal:
        return set()
    if journal["switched"]:
        return set(journal["moves"])
    return {old for old, new in journal["moves"].items()
            if new is not None and (root / "shards" / f"{new:06d}.items.parquet").is_file()}


def drop_removed(table: pa.Table, removed: np.ndarray) -> pa.Table:
    """*table* (items, with an ``id`` column) without the rows of *removed* ids."""
    if not len(removed) or not table.num_rows:
        return table
    keep = ~np.isin(table.column("id").to_numpy(), removed)
    return table if keep.all() else table.filter(pa.array(keep))
