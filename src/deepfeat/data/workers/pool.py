"""The pool: :class:`SupervisedPool`, an :class:`~concurrent.futures.Executor` over ``spawn``-ed
decode workers fed by a supervisor thread (see :mod:`deepfeat.data.workers`)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable

from deepfeat.data.workers.recovery import RecoveryMixin
from deepfeat.data.workers.worker import PerItem, WorkerStartError, _how_it_died, _worker_main


@dataclass
class _Task:
    id: int
    fn: Callable
    args: tuple
    future: Future
    per_item: PerItem | None = None
    results: list = field(default_factory=list)  # per-item results so far
    alone: bool = False  # the next item is being retried alone after its worker died
    sent: int = 0  # items in the chunk now dispatched


@dataclass
class _Worker:
    proc: Any
    conn: Any
    ready: bool = False
    #: tasks sent, in the order the worker runs them: the first is running, the next waits in
    #: its pipe (so the worker never idles for a round trip between two batches)
    tasks: deque = field(default_factory=deque)
    last: float = 0.0  # when the current item started (dispatch or the previous item's result)

    @property
    def task(self) -> _Task | None:
        return self.tasks[0] if self.tasks else None


#: tasks in flight per worker: the one it runs and one queued behind it
PREFETCH = 2


class SupervisedPool(Executor, RecoveryMixin):
    """*workers* decode processes with per-item timeouts and replacement (see the module docstring).

    *timeout*: seconds one item of a batch function may take (None: no limit).
    """

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = (),
                 timeout: float | None = None, mp_context=None):
        import multiprocessing as mp

        if workers < 1:
            raise ValueError("a SupervisedPool needs at least one worker")
        self._ctx = mp_context or mp.get_context("spawn")
        self._n = workers
        self._init, self._initargs = initializer, initargs
        self.timeout = timeout if timeout and timeout > 0 else None
        self._queue: deque[_Task] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self._broken: str | None = None
        self._stop = False
        self._drain = False  # stop once the queued and running tasks are done
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        #: what happened, for reports and tests: worker restarts, timed-out and lost items
        self.stats = {"restarts": 0, "timeouts": 0, "deaths": 0}
        for _ in range(workers):
            self._workers.append(self._spawn())
        self._thread = threading.Thread(target=self._loop, name="deepfeat-pool", daemon=True)
        self._thread.start()

    # -- the Executor interface (called from the user's thread) --------------

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if kwargs:
            raise TypeError("SupervisedPool.submit takes positional arguments only")
        fut: Future = Future()
        per_item = getattr(fn, "per_item", None)
        if per_item is not None:
            if len(args) != 1:
                raise TypeError(f"{fn.__name__} takes one list of items")
            args = (list(args[0]),)
        task = _Task(next(self._ids), fn, args, fut, per_item)
        with self._lock:
            if self._stop or self._drain:
                raise RuntimeError("cannot submit to a pool that is shutting down")
            if self._broken:
                fut.set_exception(WorkerStartError(self._broken))
                return fut
            self._queue.append(task)
        self._wake()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if cancel_futures:
                while self._queue:
                    self._queue.popleft().future.cancel()
            if wait:
                self._drain = True
            else:
                self._stop = True
        self._wake()
        if wait or self._thread.is_alive():
            self._thread.join(timeout=None if wait else 10)
        self._kill_all()

    @property
    def pids(self) -> list[int]:
        """The current workers' process ids (for tests and diagnostics)."""
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    # -- the supervisor thread -------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"")
        except OSError:
            pass

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self._init, self._initargs), daemon=True,
                                 name="deepfeat-decode")
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stop:
                        return
                    if self._drain and not self._queue and not any(w.task for w in self._workers):
                        return
                self._dispatch()
                waitables = [self._wake_r] + [w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers]
                ready = set(wait(waitables, timeout=self._next_deadline()))
                if self._wake_r in ready:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                for w in list(self._workers):
                    if w.conn in ready or w.proc.sentinel in ready:
                        self._read(w)
                self._check_timeouts()
        except BaseException as e:  # noqa: BLE001 - never leave a caller waiting forever
            self._fail_all(f"the decode pool's supervisor failed: {type(e).__name__}: {e}")

    def _next_deadline(self) -> float:
        if self.timeout is None:
            return 1.0
        now = time.monotonic()
        left = [w.last + self.timeout - now for w in self._workers if w.task and w.task.per_item]
        return max(0.01, min([1.0] + left))

    def _dispatch(self) -> None:
        for w in self._workers:
            while w.ready and len(w.tasks) < PREFETCH and w.proc.is_alive():
                with self._lock:
                    if not self._queue:
                        return
                    task = self._queue.popleft()
                if not self._send(w, task):
                    break

    def _send(self, w: _Worker, task: _Task) -> bool:
        if task.per_item:
            items = task.args[0][len(task.results):]
            if task.alone:
                items = items[:1]
            task.sent = len(items)
            msg = (task.id, task.per_item.one, items, True)
        else:
            msg = (task.id, task.fn, task.args, False)
        if not w.tasks:
            w.last = time.monotonic()
        w.tasks.append(task)
        try:
            w.conn.send(msg)
        except (OSError, EOFError):
            w.proc.join(timeout=10)
            self._lost(w, _how_it_died(w.proc.exitcode))
            return False
        return True

    def _read(self, w: _Worker) -> None:
        try:
            while w.conn.poll():
                kind, tid, k, payload = w.conn.recv()
                if kind == "ready":
                    w.ready = True
                    self._start_failures = 0
                    continue
                task = w.task
                if task is None or task.id != tid:
                    continue
                if kind == "item":
                    task.results.append(payload)
                    w.last = time.monotonic()
                    continue
                w.tasks.popleft()
                w.last = time.monotonic()  # the next task, if any, starts now
                if kind == "done":
                    self._chunk_done(task, payload)
                else:  # "error": the task itself raised
                    task.future.set_exception(payload)
        except (EOFError, OSError):
            pass
        if not w.proc.is_alive():
            w.proc.join()
            self._lost(w, _how_it_died(w.proc.exitcode))

    def _chunk_done(self, task: _Task, result: Any) -> None:
        if not task.per_item:
            task.future.set_result(result)
            return
        task.alone = False
        if len(task.results) < len(task.args[0]):
            with self._lock:
                self._queue.appendleft(task)  # the rest of a batch whose item was retried alone
        else:
            task.future.set_result(task.per_item.merge(task.results))

