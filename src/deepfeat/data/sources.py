"""What an item was made from: the size, modification time and content hash (sha256) of
its file, taken from the same read as the bytes that are decoded, so that a later
``deepfeat sync`` can tell a changed file from an unchanged one.

A :class:`SourceRecord` is cheap to compare by ``stat`` alone (size and ``mtime_ns``);
the hash settles the cases where the ``stat`` differs (a file copied back, touched, or
rewritten with the same bytes) without decoding anything. :meth:`SourceRecord.unchanged` is
the one rule by which deepfeat decides whether a file is still the one an item was made from
(``deepfeat sync`` and the duplicates actions, :mod:`deepfeat.collection.actions`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceRecord:
    """A file as it was read: its size in bytes, its ``st_mtime_ns`` and the sha256 of its bytes."""

    size: int
    mtime_ns: int
    sha256: str

    def same_stat(self, st: os.stat_result) -> bool:
        """Whether *st* (a file's ``stat`` now) has the size and modification time recorded."""
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns

    def unchanged(self, st: os.stat_result, digest: Callable[[], str | None], trust_stat: bool = True) -> bool:
        """Whether a file is still the one this record was taken from: its ``stat`` now (*st*) has
        the recorded size and modification time, or else the sha256 of its bytes now (*digest*,
        called only then; None when they cannot be read) is the recorded one. So a touched file, or
        one copied back with its bytes, is unchanged; an edited one is changed.

        With *trust_stat* (``deepfeat sync``: only the files whose ``stat`` differs are read) a file
        rewritten in place with the same size and its modification time put back passes unread;
        without it (the duplicates actions, which delete or move) the bytes are always compared."""
        if trust_stat and self.same_stat(st):
            return True
        h = digest()
        return h is not None and h == self.sha256


def read_recorded(path: str) -> tuple[bytes, SourceRecord]:
    """The bytes of *path* and their record, from one open: the ``stat`` is taken on the open
    file before it is read, so a file replaced meanwhile is recorded as the one that was read
    (a file written while it is read gets the hash of what was read, never of another version)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    return data, SourceRecord(len(data), st.st_mtime_ns, hashlib.sha256(data).hexdigest())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks, as hex (the one file hash of the package)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def readable_sha256(path: str | os.PathLike) -> str | None:
    """:func:`file_sha256` of *path*, or None when it cannot be read."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def file_record(path: str) -> SourceRecord | None:
    """The record of *path* as it is now (``stat`` then hash), or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            h = hashlib.sha256()
            size = 0
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
    except OSError:
        return None
    return SourceRecord(size, st.st_mtime_ns, h.hexdigest())
