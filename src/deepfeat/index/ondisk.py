"""IVF and IVF-PQ indexes whose inverted lists live on disk, memory-mapped at search time.

For collections whose vectors do not fit in memory (FAISS's "indexing 1G vectors" recipe,
``faiss.contrib.ondisk``): the coarse quantizer (and PQ) are trained on a sample; the rows are
added shard by shard, each shard an ordinary IVF index over a slice of the rows, filled chunk by
chunk and written to disk, so a worker holds one chunk of vectors and one shard's codes at a time;
shards are built by parallel worker processes or Ray tasks (:mod:`deepfeat.index.shard_fill`), all
sharing the one trained quantizer; then their inverted lists are merged into one
``lists.ivfdata`` file (FAISS ``OnDiskInvertedLists``), which searches read through ``mmap``: the
pages a query touches are read from disk, and the kernel may drop them again.

A folder holds ``index.faiss`` (the trained quantizer and the lists' table of contents),
``lists.ivfdata`` (codes and ids) and ``index.json`` (self-describing meta, as
:class:`~deepfeat.index.faiss_index.Index` writes). Moving the folder is fine: the lists file is
opened relative to the index (``IO_FLAG_ONDISK_SAME_DIR``). A build happens in a staging folder
beside it and is moved in when complete (:func:`_commit`).

The rows come from a :class:`VectorSource` (rows ``[start, stop)`` as float32 with their ids):
:class:`StoreSource` reads a feature store's shards (memory-mapped) with its post-processing.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deepfeat.errors import StoreError, UsageError
from deepfeat.index.checks import _faiss
from deepfeat.index.persist import faiss_io_reason, read_index, write_faiss
from deepfeat.store.checksums import file_digest

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
LISTS_FILE = "lists.ivfdata"
META_FILE = "index.json"
TRAINED_FILE = "trained.faiss"
#: a build happens in NAME.building-HOST-PID beside the index folder NAME, moved in when complete
STAGING = ".building-"
ONDISK_KINDS = ("ivf", "ivfpq")
#: threads FAISS starts to read a query's lists ahead (OnDiskInvertedLists.prefetch_nthread, FAISS's
#: default 32); 0: the search threads read the pages as they scan them (docs/scaling.md)
PREFETCH_THREADS = 0
#: rows added to a shard at a time (a chunk of float32 vectors in memory: 64 MB at d=256)
CHUNK_ROWS = 65_536


class VectorSource(Protocol):
    """Rows of an N x D float32 collection, read a slice at a time (picklable: worker processes read it)."""

    n: int
    d: int

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, vectors float32 ``(stop - start) x d``) of rows ``[start, stop)``."""
        ...


class ArraySource:
    """Rows of an array in memory or a ``.npy`` file (memory-mapped); ids are row numbers."""

    def __init__(self, xb: np.ndarray | str | os.PathLike):
        self.path = None if isinstance(xb, np.ndarray) else os.path.abspath(xb)
        self._xb = xb if isinstance(xb, np.ndarray) else None
        self.n, self.d = self._array().shape

    def _array(self) -> np.ndarray:
        return self._xb if self._xb is not None else np.load(self.path, mmap_mode="r")

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(start, stop, dtype=np.int64), np.ascontiguousarray(self._array()[start:stop], np.float32)


class StoreSource:
    """A feature store's rows with its post-processing applied, one store shard (memory-mapped) at a time;
    ids are store row numbers, as :class:`~deepfeat.index.faiss_index.Index` built from the store has."""

    def __init__(self, path: str | os.PathLike, feature: str | None = None):
        from deepfeat.store import FeatureStore

        self.path, self.feature = os.path.abspath(path), feature  # read by workers with another cwd
        store = FeatureStore(self.path)
        self.n, self.d = len(store), int(store.post.output_dim(store.dim))
        if not store.post.fitted:
            raise StoreError(f"{path}: post-processing {store.post.spec!r} is not fitted yet; run `deepfeat postprocess`")

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        from deepfeat.store import FeatureStore

        store = FeatureStore(self.path)
        parts, offset = [], 0
        for _, arr in store.features(self.feature, mmap=True):
            lo, hi = max(start, offset), min(stop, offset + len(arr))
            if lo < hi:
                parts.append(np.asarray(arr[lo - offset: hi - offset], np.float32))
            offset += len(arr)
            if offset >= stop:
                break
        x = np.concatenate(parts) if parts else np.zeros((0, self.d), np.float32)
        return np.arange(start, stop, dtype=np.int64), np.ascontiguousarray(store.post.apply(x), np.float32)


def shard_bounds(n: int, shard_rows: int) -> list[tuple[int, int]]:
    shard_rows = max(1, int(shard_rows))
    return [(s, min(n, s + shard_rows)) for s in range(0, n, shard_rows)]


def rows_for_memory(max_memory: int, d: int, code_bytes: int, workers: int,
                    chunk_rows: int = CHUNK_ROWS) -> tuple[int, int]:
    """(rows per shard, rows per chunk) so that *workers* shards being filled at once stay within
    *max_memory* bytes (the data: not the interpreter, numpy and FAISS, about 140 MB per process).
    Each worker holds a chunk of float32 rows three times over (as read, post-processed, encoded;
    the chunk at most an eighth of its share, at most *chunk_rows*) and its shard's codes and ids
    (``code_bytes + 8`` bytes per row) counted twice: FAISS's in-memory lists grow by doubling, so
    up to half their capacity is unused (why both counts are needed: docs/benchmarks.md, "Indexes
    beyond memory")."""
    per_worker = max_memory / max(1, workers)
    chunk = min(int(chunk_rows), int(per_worker / 8 // (d * 4)))
    if chunk < 1:
        raise UsageError(f"--max-memory {max_memory / 2**20:.1f} MB is too small for {workers} worker(s) at "
                         f"{d} dimensions; give more memory or fewer workers")
    return max(1, int((per_worker - 3 * chunk * d * 4) // (2 * (code_bytes + 8)))), chunk


def build_ondisk(source: VectorSource, folder: str | os.PathLike, kind: str = "ivf", metric: str = "ip",
                 max_memory: int | None = None, workers: int = 1, seed: int = 0, shard_rows: int | None = None,
                 chunk_rows: int = CHUNK_ROWS, source_meta: dict[str, Any] | None = None, engine: str = "local",
                 ray_address: str | None = None, **params: Any):
    """Build an on-disk *kind* (``ivf`` or ``ivfpq``) index of *source* in *folder* and return it opened
    (:func:`open_ondisk`). Shards of *shard_rows* rows (default: what *max_memory* bytes allow for
    *workers* shards filled at once, :func:`rows_for_memory`; else 1,000,000) are filled by *workers*
    local processes (``engine="local"``) or Ray tasks (``engine="ray"``, on the cluster at *ray_address*:
    :mod:`deepfeat.index.shard_fill`) and merged. *params*: the kind's parameters (``nlist``, ``nprobe``,
    ``M``, ``nbits``, ``train_size``), defaults as for the in-memory kind (:func:`deepfeat.index.plan.plan_index`).

    Everything is built in a staging folder beside *folder* and moved in when complete
    (:func:`_commit`): an interrupted build leaves *folder* as it was, or without an index, never with
    a half-written one; a staging folder left by a killed build is removed by the next build."""
    from deepfeat.index.persist import write_index
    from deepfeat.index.plan import plan_index
    from deepfeat.index.shard_fill import ENGINES, require_ray

    if kind not in ONDISK_KINDS:
        raise UsageError(f"on-disk index kind {kind!r}: choose {', '.join(ONDISK_KINDS)}")
    if engine not in ENGINES:
        raise UsageError(f"index build engine {engine!r}: choose {', '.join(ENGINES)}")
    if engine == "ray":
        require_ray()  # before the training, not after
    folder = Path(folder).absolute()  # workers (Ray's on other nodes) need paths that do not depend on their cwd
    plan = plan_index(source.n, source.d, kind, metric, **params)
    stage = _staging_folder(folder)
    try:
        index, meta = _build_in(stage, source, plan, metric, max_memory, workers, seed, shard_rows, chunk_rows,
                                source_meta, engine, ray_address)
        write_index(index, meta, stage)  # index.faiss (quantizer + the lists' table) and index.json
        del index  # unmaps the lists before they move
        _commit(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return open_ondisk(folder)


def _build_in(stage: Path, source: VectorSource, plan, metric: str, max_memory: int | None, workers: int,
              seed: int, shard_rows: int | None, chunk_rows: int, source_meta, engine: str,
              ray_address: str | None) -> tuple[Any, dict[str, Any]]:
    """Train on a sample, fill the shards, merge their lists into ``stage/lists.ivfdata``; (index, meta)."""
    from deepfeat.index.faiss_index import _train
    from deepfeat.index.shard_fill import ShardJob, fill_shards

    faiss = _faiss()
    t0 = time.perf_counter()
    metric_type = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    index = faiss.index_factory(source.d, plan.factory, metric_type)
    sample = _training_sample(source, plan.params["train_size"], seed)
    _train(faiss, index, sample, plan, seed)
    del sample
    trained = stage / TRAINED_FILE
    write_faiss(index, trained)
    train_seconds = time.perf_counter() - t0
    code_bytes = faiss.extract_index_ivf(index).code_size
    if max_memory:
        fit_rows, chunk_rows = rows_for_memory(max_memory, source.d, code_bytes, workers, chunk_rows)
        shard_rows = min(shard_rows or fit_rows, fit_rows)
    shard_rows = shard_rows or 1_000_000
    bounds = shard_bounds(source.n, shard_rows)
    jobs = [ShardJob(str(trained), lo, hi, str(stage / f"shard{i:05d}.faiss"), chunk_rows,
                     1 if workers > 1 else None) for i, (lo, hi) in enumerate(bounds)]
    t1 = time.perf_counter()
    shards = fill_shards(source, jobs, workers, engine, ray_address)
    add_seconds = time.perf_counter() - t1
    _merge_shards(index, shards, stage / LISTS_FILE)
    for f in [*shards, str(trained)]:
        os.remove(f)
    meta = _meta(plan, metric, index, seed, source_meta, t0, train_seconds, add_seconds, len(shards), shard_rows)
    meta["storage"].update(workers=int(workers), engine=engine)
    meta["files"] = {LISTS_FILE: file_digest(stage / LISTS_FILE)}  # checked on load (size, sample), by `info --verify`
    return index, meta


def _merge_shards(index, shards: list[str], lists: Path) -> None:
    """Merge the shards' inverted lists into the on-disk lists file *lists* and give them to the empty
    trained *index* (FAISS ``OnDiskInvertedLists.merge_from_multiple``, as ``faiss.contrib.ondisk.merge_ondisk``
    does, except that the shards, read memory-mapped, are closed afterwards: ``merge_ondisk`` leaves their
    lists allocated and mapped for the life of the process, which at 10M x 128 kept 5 GB of deleted shard
    files mapped and their disk space held)."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(index)
    parts = [faiss.read_index(f, faiss.IO_FLAG_MMAP) for f in shards]  # each owns its lists: freed with it
    pointers = faiss.InvertedListsPtrVector()
    for part in parts:
        pointers.push_back(faiss.extract_index_ivf(part).invlists)
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(lists))
    try:
        ntotal = invlists.merge_from_multiple(pointers.data(), pointers.size(), False)
    except RuntimeError as e:  # a full disk: FAISS's own message, made the system's reason
        raise StoreError(f"cannot write {lists}: {faiss_io_reason(e)}") from None
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()  # the index owns the merged lists now
    del pointers, parts


def _staging_folder(folder: Path) -> Path:
    """A new, empty staging folder beside *folder* (``NAME.building-HOST-PID``), after removing the ones
    that builds on this host left when they were killed (their process is gone)."""
    host = socket.gethostname()
    folder.parent.mkdir(parents=True, exist_ok=True)
    for old in folder.parent.glob(f"{folder.name}{STAGING}{host}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an interrupted index build", old)
            shutil.rmtree(old, ignore_errors=True)
    stage = folder.parent / f"{folder.name}{STAGING}{host}-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _commit(stage: Path, folder: Path) -> None:
    """Move a complete build from *stage* into *folder*, each file by a rename: the old index's meta
    first removed (from then on there is no index, rather than an old table over new lists), then the
    lists, the index, and its meta last (the commit marker). A kill at any point leaves complete files
    and the old index, no index, or the new one; other files in *folder* are left alone."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / META_FILE).unlink(missing_ok=True)
    for name in (LISTS_FILE, INDEX_FILE, META_FILE):
        os.replace(stage / name, folder / name)


def _training_sample(source: VectorSource, train_size: int, seed: int) -> np.ndarray:
    """*train_size* rows drawn with *seed* (all rows if fewer), read in sorted order."""
    n = source.n
    if train_size >= n:
        return source.rows(0, n)[1]
    pick = np.sort(np.random.default_rng(seed).choice(n, train_size, replace=False))
    out = np.empty((train_size, source.d), np.float32)
    done = 0
    for lo, hi in shard_bounds(n, CHUNK_ROWS):  # one chunk in memory at a time
        sel = pick[(pick >= lo) & (pick < hi)]
        if sel.size:
            out[done: done + sel.size] = source.rows(lo, hi)[1][sel - lo]
            done += sel.size
    return out


def _meta(plan, metric: str, index, seed: int, source_meta, t0: float, train_seconds: float, add_seconds: float,
          shards: int, shard_rows: int) -> dict[str, Any]:
    from deepfeat import __version__
    from deepfeat.index.persist import META_FORMAT, META_VERSION

    faiss = _faiss()
    return {
        "format": META_FORMAT, "format_version": META_VERSION, "kind": plan.kind, "requested_kind": plan.kind,
        "metric": metric, "d": plan.d, "ntotal": int(index.ntotal), "params": dict(plan.params),
        "factory": plan.factory, "seed": int(seed), "train_size": int(plan.params["train_size"]),
        "next_id": int(index.ntotal), "memory_bytes": plan.memory_bytes,
        "storage": {"lists": LISTS_FILE, "shards": shards, "shard_rows": int(shard_rows),
                    "lists_bytes": int(os.path.getsize(Path(faiss_lists_path(index)))) if faiss_lists_path(index)
                    else None},
        "build_seconds": round(time.perf_counter() - t0, 3), "train_seconds": round(train_seconds, 3),
        "add_seconds": round(add_seconds, 3), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "deepfeat_version": __version__, "faiss_version": faiss.__version__,
        "source_meta": dict(source_meta or {}), "augmentation": None,
    }


def faiss_lists_path(index) -> str | None:
    """The file an on-disk IVF index's lists are in (None for lists in memory)."""
    faiss = _faiss()
    invlists = faiss.extract_index_ivf(index).invlists
    ondisk = faiss.downcast_InvertedLists(invlists)
    return getattr(ondisk, "filename", None)


def is_ondisk(folder: str | os.PathLike) -> bool:
    return (Path(folder) / LISTS_FILE).is_file() and (Path(folder) / META_FILE).is_file()


def open_ondisk(folder: str | os.PathLike, threads: int | None = None, prefetch_threads: int = PREFETCH_THREADS):
    """The on-disk index in *folder* as an :class:`~deepfeat.index.faiss_index.Index`, its lists memory-mapped."""
    from deepfeat.index.faiss_index import Index

    folder = Path(folder)
    missing: Sequence[str] = [f for f in (INDEX_FILE, LISTS_FILE, META_FILE) if not (folder / f).is_file()]
    if missing:
        raise StoreError(f"{folder} is not an on-disk index (missing {', '.join(missing)}); build one with "
                         "deepfeat.index.ondisk.build_ondisk")
    faiss = _faiss()
    index, meta = read_index(folder)  # the same checks as any saved index; lists opened beside it
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    lists.prefetch_nthread = int(prefetch_threads)
    return Index(index, meta, threads=threads)


def parse_bytes(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5G"``, ``"800000000"`` -> bytes (K, M, G, T: powers of 1024)."""
    t = str(text).strip().upper().removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise UsageError(f"--max-memory {text!r}: give a size such as 512M, 2G or a number of bytes") from None
    if value <= 0:
        raise UsageError(f"--max-memory {text!r}: must be positive")
    return int(value * scale)


def ondisk_memory(plan, max_memory: int | None = None, workers: int = 1) -> dict[str, int]:
    """What an on-disk build of *plan* (an ivf/ivfpq :class:`~deepfeat.index.plan.IndexPlan`) costs:
    ``disk_bytes`` (the lists: codes + 8-byte ids), ``resident_bytes`` (what stays in memory when
    searching: centroids, the lists' table, PQ tables; the lists' pages come and go with the page
    cache), ``build_bytes`` (what the *workers* shards being filled at once hold: *max_memory* when
    given, else 1M-row shards), ``shard_rows`` and ``shards`` (how the rows are split), ``worker_bytes``
    (one worker's share) and ``train_bytes`` (the training sample, held by the building process before
    the shards are filled, besides the bound)."""
    n, d, p = plan.n, plan.d, plan.params
    code = d * 4 if plan.kind == "ivf" else int(p["M"]) * int(p["nbits"]) // 8
    resident = int(p["nlist"]) * d * 4 + int(p["nlist"]) * 24
    if plan.kind == "ivfpq":
        resident += int(p["M"]) * (2 ** int(p["nbits"])) * (d // int(p["M"])) * 4
    workers = max(1, int(workers))
    if max_memory:
        shard_rows, chunk = rows_for_memory(max_memory, d, code, workers)
    else:
        shard_rows, chunk = 1_000_000, CHUNK_ROWS
    shard_rows = min(shard_rows, n)
    worker = 2 * shard_rows * (code + 8) + 3 * min(chunk, shard_rows) * d * 4  # as rows_for_memory counts
    return {"disk_bytes": n * (code + 8), "resident_bytes": resident,
            "build_bytes": int(max_memory or worker * workers), "worker_bytes": int(worker),
            "shard_rows": int(shard_rows), "shards": -(-n // shard_rows), "train_bytes": min(n, int(p["train_size"])) * d * 4}


def describe_ondisk(plan, max_memory: int | None = None, workers: int = 1, engine: str = "local") -> str:
    """The memory model of an on-disk build in one line, as ``deepfeat index`` prints it."""
    m = ondisk_memory(plan, max_memory, workers)
    mb = 2**20
    where = "Ray tasks" if engine == "ray" else "worker processes" if workers > 1 else "this process"
    return (f"on disk: {plan.kind}, lists {m['disk_bytes'] / mb:.1f} MB on disk, {m['resident_bytes'] / mb:.1f} MB "
            f"resident when searching (memory-mapped); building {m['shards']} shard(s) of {m['shard_rows']:,} rows, "
            f"{workers} at a time in {where}, within {m['build_bytes'] / mb:.0f} MB ({m['worker_bytes'] / mb:.0f} MB "
            f"each; training sample {m['train_bytes'] / mb:.0f} MB before them)")
