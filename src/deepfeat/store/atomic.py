"""Atomic, durable file writes: through a temporary file (named by host and pid), fsynced,
then renamed over the real name, the temporary removed on any failure.

A crash never leaves a half-written file under its real name. The store writes every
file this way, and so do the other artefacts (recipes, fine-tuning runs, index metas,
local features).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _tmp_name(path: Path) -> Path:
    import socket

    # host and pid: two machines (or two retries) writing the same shard never share a temp file
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _atomic(path: Path, write) -> None:
    """Write through a temporary file and rename it over *path*; never leave the temp behind."""
    tmp = _tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno:  # a write() that failed names no file
            raise OSError(e.errno, e.strerror, str(tmp)) from e  # (the CLI shows the real file's name)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        # serialised in memory first: np.save straight into a file on a full disk fails with
        # "2560 requested and 2016 written" (no errno); a plain write says "No space left on device"
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    def write(tmp: Path) -> None:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    _atomic(path, write)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
