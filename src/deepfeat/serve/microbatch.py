"""Model inference off the event loop: one thread, a queue, micro-batches.

Requests put decoded pixels on a queue and await a future; a single inference
thread takes the first waiting item plus everything else already queued (up to
``max_batch``), runs images of the same shape as one batch and the rest one by one,
and hands each vector back to its request's event loop. It waits for more (at most
``window_ms``) only while other requests have announced themselves (their upload is
being decoded), so a lone request never pays for the window. One thread means the
model never runs concurrently with itself (PyTorch already uses every core inside
one forward pass), and the event loop only ever awaits futures. A full queue answers
503 instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np

from deepfeat.serve.uploads import ApiError
from deepfeat.serve.workbound import WorkTracker

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class BatchStats:
    """Counters for /api/health and the benchmark."""

    requests: int = 0
    batches: int = 0  # forward passes
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    busy_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"requests": self.requests, "forward_passes": self.batches, "largest_batch": self.largest,
                "mean_batch": round(self.requests / self.batches, 3) if self.batches else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "busy_seconds": round(self.busy_seconds, 3)}


def group_by_shape(pixels: Sequence[np.ndarray], max_batch: int) -> list[list[int]]:
    """Indices of *pixels* grouped by exact array shape (first-come order), at most *max_batch* per group."""
    groups: dict[tuple, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, px in enumerate(pixels):
        runs = groups.setdefault(px.shape, [])
        if not runs or len(runs[-1]) >= max_batch:
            runs.append([])
            order.append(runs[-1])
        runs[-1].append(i)
    return order


class MicroBatcher:
    """Run ``embed(batch) -> N x D`` in one background thread, batching concurrent requests.

    *embed* receives a list of same-shape H x W x C uint8 arrays and returns their
    descriptors. ``max_batch=1`` turns batching off (each request its own pass)."""

    def __init__(self, embed: Callable[[list[np.ndarray]], np.ndarray], max_batch: int = 16,
                 window_ms: float = 5.0, max_queue: int = 64, work: WorkTracker | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.embed = embed
        self.max_batch = max_batch
        self.window = max(0.0, window_ms) / 1000.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._q: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._incoming = 0  # announced requests that have not submitted yet
        #: time bound of one request's wait and the record of running passes (None: unbounded)
        self.work = work

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="deepfeat-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._q.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- requests ---------------------------------------------------------------

    async def submit(self, pixels: np.ndarray, _ticket: Ticket | None = None) -> np.ndarray:
        """The descriptor (1-D float32) of one decoded image, computed in the inference thread."""
        try:
            if not self.running:
                raise ApiError(503, "the inference thread is not running")
            stuck = self.work.stuck("inference") if self.work is not None else []
            if stuck:
                raise ApiError(503, f"the inference thread is stuck: a forward pass has run for {stuck[0]['seconds']} s, "
                                    f"over the work timeout of {self.work.bound_s:g} s (see /api/health)",
                               {"stuck": stuck}, headers={"Retry-After": "10"})
            if self._q.qsize() >= self.max_queue:
                raise ApiError(503, f"busy: {self.max_queue} images are already waiting for the model; retry "
                                    "shortly", {"queue": self.max_queue}, headers={"Retry-After": "1"})
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._q.put((pixels, fut, loop, time.monotonic()))  # the bound counts from here
        finally:
            if _ticket is not None:
                _ticket.close()
        if self.work is None:
            return await fut
        try:
            return await asyncio.wait_for(fut, self.work.bound_s)
        except asyncio.TimeoutError:
            raise ApiError(503, f"inference took longer than the server's work timeout of {self.work.bound_s:g} s",
                           {"work_timeout_seconds": self.work.bound_s}, headers={"Retry-After": "10"}) from None

    @contextmanager
    def announce(self) -> Iterator[Ticket]:
        """Say that a request will submit soon (its image is being decoded), so that the
        inference thread may wait for it to share a batch::

            with batcher.announce() as ticket:
                pixels = await decode(...)
                vector = await ticket.submit(pixels)
        """
        ticket = Ticket(self)
        with self._lock:
            self._incoming += 1
        try:
            yield ticket
        finally:
            ticket.close()

    @property
    def incoming(self) -> int:
        """Announced requests that have not submitted yet."""
        return self._incoming

    @property
    def queued(self) -> int:
        """Images waiting for the model."""
        return self._q.qsize()

    # -- the inference thread -----------------------------------------------------

    def _gather(self, first) -> tuple[list, bool]:
        """*first* and what else is queued; wait (up to the window) only for announced requests."""
        batch, stop = [first], False
        deadline = time.monotonic() + self.window
        while len(batch) < self.max_batch:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                wait = deadline - time.monotonic()
                if wait <= 0 or self._incoming == 0:
                    break
                try:
                    item = self._q.get(timeout=wait)
                except queue.Empty:
                    break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._q.get()
            if first is _STOP:
                break
            batch, stop = self._gather(first)
            live = [b for b in batch if not b[1].cancelled()]
            if not live:
                continue
            t0 = time.perf_counter()
            for idx in group_by_shape([b[0] for b in live], self.max_batch):
                items = [live[i] for i in idx]
                try:
                    since = min(it[3] for it in items)
                    with self.work.running(f"forward pass of {len(items)}", "inference", since) if self.work \
                            else nullcontext():
                        out = self.embed([it[0] for it in items])
                    results = [(it, out[j], None) for j, it in enumerate(items)]
                except Exception as e:  # hand the error to every request of the group
                    log.exception("inference failed for a batch of %d", len(items))
                    results = [(it, None, e) for it in items]
                with self._lock:
                    self.stats.batches += 1
                    self.stats.requests += len(items)
                    self.stats.sizes[len(items)] += 1
                    self.stats.largest = max(self.stats.largest, len(items))
                for (px, fut, loop, _), vec, err in results:
                    _post(loop, fut, vec, err)
            with self._lock:
                self.stats.busy_seconds += time.perf_counter() - t0
        # fail whatever is still queued
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                _post(item[2], item[1], None, ApiError(503, "the server is shutting down"))


class Ticket:
    """An announced request (see :meth:`MicroBatcher.announce`)."""

    def __init__(self, batcher: MicroBatcher):
        self.batcher = batcher
        self.open = True

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        return await self.batcher.submit(pixels, _ticket=self)

    def close(self) -> None:
        if self.open:
            self.open = False
            with self.batcher._lock:
                self.batcher._incoming -= 1


def _post(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, value, err) -> None:
    try:
        loop.call_soon_threadsafe(_resolve, fut, value, err)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def _resolve(fut: asyncio.Future, value, err) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(value)
