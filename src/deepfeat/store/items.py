"""The items table of a store and its shards: the parquet schemas, the per-shard column
accumulator :class:`ShardItems`, and the file-name form of a feature (layer) name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

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
    ]
)
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

    @classmethod
    def empty(cls) -> "ShardItems":
        return cls([], [], [], [], [], [], [], [])

    def __len__(self) -> int:
        return len(self.id)

    def add(self, id: int, path: str, *, ok: bool, error: str | None = None, width: int | None = None,
            height: int | None = None, offset: int = -1, notes: Sequence[str] = ()) -> None:
        self.id.append(int(id))
        self.path.append(path)
        self.status.append("ok" if ok else "error")
        self.error.append(error)
        self.width.append(width)
        self.height.append(height)
        self.offset.append(int(offset))
        self.notes.append(",".join(notes) if notes else None)

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
            },
            schema=ITEM_SCHEMA,
        )
