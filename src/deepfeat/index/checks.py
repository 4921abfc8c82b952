"""The FAISS import and its OpenMP threads, and the checks of what crosses the index boundary.

The boundary is an N x D float32 C-contiguous matrix (``xb``, ``xq``) plus one int64 id
per row; :func:`check_vectors` checks it once and refuses, rather than copies, anything
else. The smaller checks (ids, k, metric) are shared by the other modules of
:mod:`deepfeat.index`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from deepfeat.errors import DeepfeatError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import faiss as _faiss_module

METRICS = ("ip", "l2")

_FINITE_CHECK_ROWS = 65_536


# --------------------------------------------------------------------------- faiss, threads


def _faiss() -> _faiss_module:
    """Import FAISS lazily: it is the optional ``[search]`` extra."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is installed in the dev environment
        raise DeepfeatError(
            f"FAISS is not installed ({e}): install the search extra, pip install 'deepfeat[search]'"
        ) from None
    return faiss


def _check_threads(threads: int | None) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise UsageError(f"threads must be a positive integer or None, not {threads!r}")
    return int(threads)


@contextlib.contextmanager
def omp_threads(threads: int | None) -> Iterator[None]:
    """Run FAISS with *threads* OpenMP threads (``faiss.omp_set_num_threads``), then restore."""
    threads = _check_threads(threads)
    if threads is None:
        yield
        return
    faiss = _faiss()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


# --------------------------------------------------------------------------- input checks


def check_vectors(x: Any, name: str = "xb", d: int | None = None) -> np.ndarray:
    """Return *x* if it is a non-empty, finite, N x D float32 C-contiguous numpy array.

    Anything else raises :class:`UsageError` saying what is wrong and how to fix it.
    Nothing is converted: float64 and non-contiguous inputs (e.g. a transposed D x N
    view) are refused, so that a layout or precision mistake upstream is seen here and
    a large matrix is never copied behind the caller's back.
    """
    if not isinstance(x, np.ndarray):
        raise UsageError(f"{name} must be a numpy array (N x D float32), not {type(x).__name__}")
    if x.ndim != 2:
        hint = f"; for one vector use {name}[None, :]" if x.ndim == 1 else ""
        raise UsageError(f"{name} must be 2-D (N x D), got shape {x.shape}{hint}")
    if x.dtype != np.float32:
        raise UsageError(
            f"{name} must be float32, got {x.dtype}: convert once with np.ascontiguousarray({name}, dtype=np.float32)"
        )
    if not x.flags.c_contiguous:
        raise UsageError(
            f"{name} must be C-contiguous (row-major N x D); a transposed D x N view or a column slice is not. "
            f"Check the layout, then copy with np.ascontiguousarray({name})"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise UsageError(f"{name} is empty: shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise UsageError(f"{name} has {x.shape[1]} dimensions, expected {d} (the index's / database's d)")
    for start in range(0, x.shape[0], _FINITE_CHECK_ROWS):
        block = x[start : start + _FINITE_CHECK_ROWS]
        ok = np.isfinite(block).all(axis=1)
        if not ok.all():
            row = start + int(np.argmin(ok))
            raise UsageError(f"{name} row {row} contains NaN or infinity")
    return x


def _check_ids(ids: Any, n: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise UsageError(f"ids must be a 1-D array of {n} integers (one per row), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise UsageError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and n and int(arr.max()) > np.iinfo(np.int64).max:
        raise UsageError("ids must fit in int64")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if n and int(arr.min()) < 0:
        raise UsageError(f"ids must be >= 0 (FAISS uses -1 for 'no result'), got {int(arr.min())}")
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.shape[0] != n:
        raise UsageError(f"ids must be unique; {int(uniq[np.argmax(counts > 1)])} appears more than once")
    return arr


def _check_k(k: Any, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"{name} must be a positive integer, not {k!r}")
    return int(k)


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    return metric
