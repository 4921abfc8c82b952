"""Filling the shards of an on-disk index: in this process, in local worker processes, or as Ray tasks.

Each shard is an ordinary IVF index over a range of rows: a copy of the one trained index (read from
``trained.faiss``) to which a worker adds its rows chunk by chunk, written to a temporary name and
renamed, so a shard file exists only complete and a retried shard (Ray retries a task whose worker
died) simply writes it again. The shards are merged afterwards (:mod:`deepfeat.index.ondisk`).

On Ray (``engine="ray"``, the engine extraction uses for a cluster, ``pip install 'deepfeat[ray]'``)
every shard is a task of one CPU; at most *workers* run at once, so that the memory bound the shards
were sized for holds across the cluster. The staging folder (the trained index, the shards) and the
rows' source (a store) must be on a file system every node sees at the same path, as for extraction.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from deepfeat.errors import DeepfeatError, UsageError
from deepfeat.index.checks import _faiss
from deepfeat.index.persist import write_faiss

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
INSTALL_HINT = "pip install 'deepfeat[ray]'"


@dataclass(frozen=True)
class ShardJob:
    """Rows ``[start, stop)`` added to a copy of the index in *trained*, written to *out*."""

    trained: str
    start: int
    stop: int
    out: str
    chunk_rows: int
    threads: int | None = None


def fill_shard(source: Any, job: ShardJob) -> str:
    """Add rows ``[job.start, job.stop)`` of *source* to a copy of the trained index, a chunk at a time,
    and write it (to a temporary name, renamed: a shard file exists only complete); returns its path."""
    faiss = _faiss()
    if job.threads:
        faiss.omp_set_num_threads(int(job.threads))
    index = faiss.read_index(job.trained)
    for lo in range(job.start, job.stop, job.chunk_rows):
        ids, xb = source.rows(lo, min(job.stop, lo + job.chunk_rows))
        index.add_with_ids(xb, ids)
    write_faiss(index, job.out)  # through a temporary name; a full disk is one line naming the file
    return job.out


def _fill_one(args: tuple[Any, ShardJob]) -> str:
    return fill_shard(*args)


def fill_shards(source: Any, jobs: list[ShardJob], workers: int = 1, engine: str = "local",
                ray_address: str | None = None) -> list[str]:
    """Fill every shard of *jobs* from *source*, *workers* at a time, with *engine* (``local``: spawned
    processes, or this one for one worker; ``ray``: Ray tasks); returns the shard paths in job order."""
    if engine not in ENGINES:
        raise UsageError(f"index build engine {engine!r}: choose {', '.join(ENGINES)}")
    if engine == "ray":
        return _fill_on_ray(source, jobs, workers, ray_address)
    if workers > 1 and len(jobs) > 1:
        # spawned, not forked: a fork after FAISS's OpenMP threads ran (training) can hang the child
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
            return list(pool.map(_fill_one, [(source, j) for j in jobs]))
    return [fill_shard(source, j) for j in jobs]


def require_ray():
    """The ``ray`` module, or a :class:`UsageError` that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise UsageError(f"--engine ray needs Ray, which is not installed ({e}): {INSTALL_HINT}") from None
    return ray


def _connect(ray, address: str | None) -> bool:
    """Join or start Ray unless this process already did; True when we must shut it down."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **kw)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**kw)
    else:  # a single-machine instance for this build
        ray.init(include_dashboard=False, **kw)
    return True


def _fill_on_ray(source: Any, jobs: list[ShardJob], workers: int, address: str | None) -> list[str]:
    """One Ray task per shard (1 CPU, FAISS on one thread), at most *workers* in flight; the source is
    put in the object store once. Ray retries a task whose worker died; a task's own error (a store it
    cannot read) is raised here as the same exception."""
    ray = require_ray()
    started = _connect(ray, address)
    try:
        task = ray.remote(num_cpus=1)(fill_shard)
        src = ray.put(source)
        done: dict[Any, int] = {}
        pending: dict[Any, int] = {}
        todo = list(enumerate(jobs))
        limit = max(1, int(workers))
        while todo or pending:
            while todo and len(pending) < limit:
                i, job = todo.pop(0)
                pending[task.remote(src, ShardJob(**{**job.__dict__, "threads": 1}))] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                done[ref] = pending.pop(ref)
                try:
                    ray.get(ref)  # a task's error now, before more shards are started
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, DeepfeatError):  # the error itself, not Ray's traceback of it
                        raise e.cause from None
                    raise
        log.info("ray: %d shard(s) filled, %d at a time", len(jobs), limit)
        return [jobs[i].out for i in sorted(done.values())]
    finally:
        if started:
            ray.shutdown()
