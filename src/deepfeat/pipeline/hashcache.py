"""File hashes remembered by file identity, so that a sync reads a touched file once, not every time.

A sync decides a file whose size or modification time differs from the store's record by its
sha256 (:mod:`deepfeat.pipeline.sync`). A file that was only touched (a backup restored, a tool that
rewrote its metadata) keeps differing from the record, which is the extraction's, so every later
sync would read it again; on a large collection that is most of a sync's time. This cache keeps, per
real path, the sha256 of the bytes with the ``stat`` they were read at: size, ``mtime_ns``,
``ctime_ns``, inode and device. A later sync that finds exactly that ``stat`` takes the hash from
here. The inode change time moves whenever a file's bytes or metadata change and a program cannot
set it back, so a file edited with its modification time put back still misses the cache and is
read; the cache is therefore stricter than the size-and-mtime rule a sync applies first.

Where: ``hashes.sqlite`` in the user cache folder (:func:`deepfeat.backends.export_cache.default_root`,
``$DEEPFEAT_CACHE``). It is only a cache: lost, damaged or unwritable, a sync reads the files again
(a damaged file is set aside and started afresh). ``--no-cache`` neither reads nor writes it. Several
processes may use it at once (SQLite, write-ahead log). Rows of files that are gone stay until the file
is removed; about 150 bytes each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

FILE = "hashes.sqlite"
_SCHEMA = ("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
           "ctime_ns INTEGER, ino INTEGER, dev INTEGER, sha256 TEXT)")


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


def same_file_state(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two ``stat`` results of a file say it was not changed in between (the cache's key)."""
    return _identity(a) == _identity(b)


class HashCache:
    """``get`` the sha256 remembered for a file with this ``stat``; ``put`` what was read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.hits = 0
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(_SCHEMA)
        self.db.commit()

    def get(self, real: str, st: os.stat_result) -> str | None:
        row = self.db.execute("SELECT size, mtime_ns, ctime_ns, ino, dev, sha256 FROM hashes WHERE path = ?",
                              (real,)).fetchone()
        if row is None or tuple(row[:5]) != _identity(st):
            return None
        self.hits += 1
        return row[5]

    def put(self, rows: Iterable[tuple[str, os.stat_result, str]]) -> None:
        """Remember (real path, the ``stat`` the bytes were read at, their sha256), in one transaction."""
        data = [(real, *_identity(st), sha) for real, st, sha in rows]
        if data:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?, ?)", data)

    def close(self) -> None:
        self.db.close()


@contextlib.contextmanager
def hash_cache(enabled: bool = True, root: str | os.PathLike | None = None) -> Iterator[HashCache | None]:
    """:func:`open_hash_cache`, closed on leaving the block."""
    cache = open_hash_cache(enabled, root)
    try:
        yield cache
    finally:
        if cache is not None:
            cache.close()


def open_hash_cache(enabled: bool = True, root: str | os.PathLike | None = None) -> HashCache | None:
    """The user's hash cache (in *root*, default the user cache folder), or None when *enabled* is false
    or it cannot be opened (then said once in the log: the sync reads the files instead)."""
    if not enabled:
        return None
    from deepfeat.backends.export_cache import default_root

    folder = Path(root) if root is not None else default_root()
    path = folder / FILE
    for attempt in (1, 2):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return HashCache(path)
        except (OSError, sqlite3.Error) as e:
            if attempt == 1 and isinstance(e, sqlite3.DatabaseError) and path.is_file():
                log.warning("file-hash cache %s is unreadable (%s): starting it afresh", path, e)
                path.replace(path.with_name(FILE + ".damaged"))
                continue
            log.warning("file-hash cache %s cannot be used (%s): files whose stat changed are read again", path, e)
            return None
    return None
