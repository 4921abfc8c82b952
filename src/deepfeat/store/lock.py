"""One writer per feature store: an OS file lock (``fcntl.flock``) held by ``extract``.

The lock is ``STORE/.extract.lock``. The kernel releases it when its holder exits in any
way, ``kill -9`` and power loss included, so a lock is never stale: the file stays (with
the last holder's pid, host and start time in it, for the message a second writer
gets), but a new run takes it at once. Opening the lock file for writing is also the
first write into the store, so a read-only store folder (or file system) is refused
before any model is loaded or image decoded.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from deepfeat.errors import StoreError

LOCK_NAME = ".extract.lock"


class StoreLock:
    """``with StoreLock(path):`` holds the store's writer lock, or raises :class:`StoreError`."""

    def __init__(self, store_dir: str | os.PathLike, create: bool = True):
        self.dir = Path(store_dir)
        self.path = self.dir / LOCK_NAME
        self.create = create
        self.fd: int | None = None
        self.created = False  # this lock made the folder (removed again if the run wrote nothing)

    def holder(self) -> dict:
        """Who holds (or last held) the lock: ``{"pid", "host", "since"}``, or ``{}``."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "StoreLock":
        import fcntl

        if not self.dir.is_dir():
            if not self.create:
                return self  # nothing to protect; the caller reports the missing store
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self.created = True
            except OSError as e:
                raise StoreError(f"cannot create the store folder {self.dir}: {e.strerror or e}") from None
        try:
            # read-only: an open-for-writing file would keep the file system from being remounted
            # read-only under a run; the holder's details are written through a second descriptor
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(_not_writable(self.dir, e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(f"cannot lock {self.path}: {e.strerror or e}") from None
            h = self.holder()
            who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('since', '?')}"
            raise StoreError(
                f"{self.dir} is being written by another `deepfeat extract` ({who}); one store has one writer "
                "at a time. Wait for that run to finish or stop it (its committed shards are kept), then run "
                "this command again.") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        try:
            with open(self.path, "w", encoding="utf-8") as f:  # closing it keeps the lock (flock is per open file)
                f.write(info)
                f.flush()
        except OSError as e:
            os.close(fd)
            raise StoreError(_not_writable(self.dir, e)) from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        if self.created and [f.name for f in self.dir.iterdir()] == [LOCK_NAME]:
            # a run refused before it wrote anything (a bad option) leaves no folder behind
            self.path.unlink(missing_ok=True)
            try:
                self.dir.rmdir()
            except OSError:
                pass
        os.close(self.fd)  # closing the only descriptor releases the flock
        self.fd = None

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def writer_active(store_dir: str | os.PathLike) -> dict | None:
    """Whether a writer holds the lock of the store at *store_dir* now, seen without taking it
    (taking it, even shared and for a moment, could make a writer that starts then fail): the
    holder's details (:meth:`StoreLock.holder`) when the kernel lists a lock on the lock file
    in ``/proc/locks``, else None. None also where that cannot be seen (no ``/proc/locks``, not
    Linux): readers never need the lock, this only lets one wait for a writer to finish."""
    path = Path(store_dir) / LOCK_NAME
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():  # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:5392619 0 EOF"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev:
            return StoreLock(store_dir).holder() or {"pid": fields[4]}
    return None


def _not_writable(folder: Path, e: OSError) -> str:
    why = e.strerror or str(e)
    hint = "free some space" if e.errno == errno.ENOSPC else "make it writable (or give `extract` another -o)"
    return f"cannot write to the store {folder}: {why}. Nothing was changed; {hint} and run the command again."
