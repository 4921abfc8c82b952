"""Decode worker processes that a bad image cannot take down with the run (see :mod:`deepfeat.workerpool.pool`)."""

from .pool import (  # noqa: F401
    MAX_START_FAILURES,
    PREFETCH,
    PerItem,
    SupervisedPool,
    WorkerLost,
    WorkerStartError,
    _how_it_died,
    _Task,
    _Worker,
    _worker_main,
)
