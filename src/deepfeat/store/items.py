"""The items table of a store and its shards: the parquet schemas, the per-shard column
accumulator :class:`ShardItems`, the file-name form of a feature (layer) name, and
:func:`source_columns` / :func:`source_records`, the per-item file records (``size``, ``mtime_ns``,
``sha256``) of a table, null where a store written before they were recorded has none."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa

from deepfeat.data.sources import SourceRecord

ITEM_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("path", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("shard", pa.int32()),
        ("offset", pa.int64()),
        ("notes", pa.string()),
        # what the item was made from (deepfeat.data.sources): null for items whose file could not be
        # read, and absent from stores written before they were recorded (read as null)
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("sha256", pa.string()),
    ]
)
SOURCE_COLUMNS = ("size", "mtime_ns", "sha256")
PLAN_SCHEMA = pa.schema([("id", pa.int64()), ("path", pa.string()), ("shard", pa.int32())])


def feature_file_key(name: str) -> str:
    """A file-name-safe form of a feature (layer) name: ``blocks.5`` -> ``blocks.5``,
    ``inception_3a/1x1`` -> ``inception_3a_1x1``, ``bn2.act:in`` -> ``bn2.act_in``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


@dataclass
class ShardItems:
    """The items of one shard, as column lists (what the pipeline accumulates)."""

    id: list[int]
    path: list[str]
    status: list[str]
    error: list[str | None]
    width: list[int | None]
    height: list[int | None]
    offset: list[int]
    notes: list[str | None]
    size: list[int | None] = field(default_factory=list)
    mtime_ns: list[int | None] = field(default_factory=list)
    sha256: list[str | None] = field(default_factory=list)

    @classmethod
    def empty(cls) -> "ShardItems":
        return cls([], [], [], [], [], [], [], [])

    def __len__(self) -> int:
        return len(self.id)

    def add(self, id: int, path: str, *, ok: bool, error: str | None = None, width: int | None = None,
            height: int | None = None, offset: int = -1, notes: Sequence[str] = (), source=None) -> None:
        """One item; *source* is the :class:`~deepfeat.data.sources.SourceRecord` of the bytes it was
        made from (None: the file could not be read)."""
        self.id.append(int(id))
        self.path.append(path)
        self.status.append("ok" if ok else "error")
        self.error.append(error)
        self.width.append(width)
        self.height.append(height)
        self.offset.append(int(offset))
        self.notes.append(",".join(notes) if notes else None)
        self.size.append(None if source is None else int(source.size))
        self.mtime_ns.append(None if source is None else int(source.mtime_ns))
        self.sha256.append(None if source is None else source.sha256)

    def table(self, shard: int) -> pa.Table:
        n = len(self.id)
        return pa.table(
            {
                "id": pa.array(self.id, pa.int64()),
                "path": pa.array(self.path, pa.string()),
                "status": pa.array(self.status, pa.string()),
                "error": pa.array(self.error, pa.string()),
                "width": pa.array(self.width, pa.int32()),
                "height": pa.array(self.height, pa.int32()),
                "shard": pa.array([shard] * n, pa.int32()),
                "offset": pa.array(self.offset, pa.int64()),
                "notes": pa.array(self.notes, pa.string()),
                "size": pa.array(self.size, pa.int64()),
                "mtime_ns": pa.array(self.mtime_ns, pa.int64()),
                "sha256": pa.array(self.sha256, pa.string()),
            },
            schema=ITEM_SCHEMA,
        )


def source_columns(table: pa.Table) -> dict[str, list]:
    """The ``size``, ``mtime_ns`` and ``sha256`` columns of an items table as lists; all null for
    a table from a store written before they were recorded."""
    return {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in SOURCE_COLUMNS}


def source_records(table: pa.Table) -> list[SourceRecord | None]:
    """One :class:`~deepfeat.data.sources.SourceRecord` per row of an items table (what its file was
    when it was extracted), None where there is none (a store written before they were recorded, an
    item whose file could not be read)."""
    cols = source_columns(table)
    return [None if None in (size, mtime, sha) else SourceRecord(int(size), int(mtime), sha)
            for size, mtime, sha in zip(cols["size"], cols["mtime_ns"], cols["sha256"])]
