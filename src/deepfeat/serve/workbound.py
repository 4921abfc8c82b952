"""A time bound on every piece of work the server runs in its threads, and the record of what
runs now, so that ``/api/health`` sees a stuck worker.

A thread cannot be killed: work that runs past the bound (a decoder caught in a bad file, a
hung device) keeps its thread. What the bound guarantees is that the *request* waiting for it
gets a JSON 503 after ``work_timeout_s`` instead of waiting forever, that ``/api/health`` names
the stuck work, and that once every worker thread is stuck later requests get a 503 at once
rather than queueing behind them."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class WorkTracker:
    """The pieces of work running now (what, which pool, since when)."""

    def __init__(self, bound_s: float):
        self.bound_s = bound_s
        self._lock = threading.Lock()
        self._running: dict[int, tuple[str, str, float]] = {}
        self._ids = itertools.count()

    @contextmanager
    def running(self, what: str, pool: str, since: float | None = None) -> Iterator[None]:
        """Record *what* as running in *pool* (``io`` or ``inference``) for the duration of the block,
        since *since* (``time.monotonic()`` when its request started waiting; default: now)."""
        token = next(self._ids)
        with self._lock:
            self._running[token] = (what, pool, time.monotonic() if since is None else since)
        try:
            yield
        finally:
            with self._lock:
                del self._running[token]

    def stuck(self, pool: str | None = None) -> list[dict]:
        """Work (of *pool*, or all) that has run longer than the bound."""
        now = time.monotonic()
        with self._lock:
            items = list(self._running.values())
        return [{"work": what, "pool": p, "seconds": round(now - t0, 1)} for what, p, t0 in items
                if now - t0 > self.bound_s and (pool is None or p == pool)]
