"""The pool: :class:`SupervisedPool`, an :class:`~concurrent.futures.Executor` over ``spawn``-ed
decode workers fed by a supervisor thread (see :mod:`deepfeat.data.workers`)."""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Executor, Future
from multiprocessing.connection import wait
from typing import Callable

from deepfeat.data.workers.processes import WorkerHandle, WorkerSet
from deepfeat.data.workers.recovery import WorkerRecovery
from deepfeat.data.workers.tasks import Task, TaskQueue
from deepfeat.data.workers.worker import WorkerStartError, how_it_died


class SupervisedPool(Executor):
    """*workers* decode processes with per-item timeouts and replacement (see the module docstring).

    *timeout*: seconds one item of a batch function may take (None: no limit), measured with
    *clock* (monotonic seconds; tests pass a clock they control).
    """

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = (),
                 timeout: float | None = None, mp_context=None, clock: Callable[[], float] = time.monotonic):
        import multiprocessing as mp

        if workers < 1:
            raise ValueError("a SupervisedPool needs at least one worker")
        ctx = mp_context or mp.get_context("spawn")
        self._ids = itertools.count()
        self._queue = TaskQueue()
        self._workers = WorkerSet(workers, ctx, initializer, initargs)
        self._recovery = WorkerRecovery(self._workers, self._queue, timeout if timeout and timeout > 0 else None,
                                        clock)
        #: what happened, for reports and tests: worker restarts, timed-out and lost items
        self.stats = self._recovery.stats
        self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._loop, name="deepfeat-pool", daemon=True)
        self._thread.start()

    @property
    def timeout(self) -> float | None:
        return self._recovery.timeout

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
        task = Task(next(self._ids), fn, args, fut, per_item)
        if not self._queue.put(task):
            fut.set_exception(WorkerStartError(self._queue.broken))
            return fut
        self._wake()
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._queue.close(drain=wait, cancel=cancel_futures)
        self._wake()
        if wait or self._thread.is_alive():
            self._thread.join(timeout=None if wait else 10)
        self._workers.stop_all()

    @property
    def pids(self) -> list[int]:
        """The current workers' process ids (for tests and diagnostics)."""
        return self._workers.pids

    # -- the supervisor thread -------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"")
        except OSError:
            pass

    def _loop(self) -> None:
        try:
            while not self._finished():
                self._dispatch()
                handles = self._workers.handles
                waitables = [self._wake_r] + [w.conn for w in handles] + [w.proc.sentinel for w in handles]
                ready = set(wait(waitables, timeout=self._recovery.seconds_to_next_check()))
                if self._wake_r in ready:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                for w in self._workers:
                    if w.conn in ready or w.proc.sentinel in ready:
                        self._read(w)
                self._recovery.check_timeouts()
        except WorkerStartError as e:
            self._fail_all(str(e))
        except BaseException as e:  # noqa: BLE001 - never leave a caller waiting forever
            self._fail_all(f"the decode pool's supervisor failed: {type(e).__name__}: {e}")

    def _finished(self) -> bool:
        if self._queue.stopped:
            return True
        return self._queue.draining and not self._queue and not self._workers.busy()

    def _dispatch(self) -> None:
        for w in self._workers:
            while w.has_room:
                task = self._queue.pop()
                if task is None:
                    return
                if not self._send(w, task):
                    break

    def _send(self, w: WorkerHandle, task: Task) -> bool:
        msg = task.message()
        if not w.tasks:
            self._recovery.item_started(w)
        w.tasks.append(task)
        try:
            w.conn.send(msg)
        except (OSError, EOFError):
            w.proc.join(timeout=10)
            self._recovery.lost(w, how_it_died(w.proc.exitcode))
            return False
        return True

    def _read(self, w: WorkerHandle) -> None:
        try:
            while w.conn.poll():
                kind, tid, _, payload = w.conn.recv()
                if kind == "ready":
                    self._recovery.worker_ready(w)
                    continue
                task = w.task
                if task is None or task.id != tid:
                    continue
                if kind == "item":
                    task.results.append(payload)
                    self._recovery.item_started(w)
                    continue
                w.tasks.popleft()
                self._recovery.item_started(w)  # the next task, if any, starts now
                if kind == "done":
                    self._recovery.chunk_ended(task, payload)
                else:  # "error": the task itself raised
                    task.fail(payload)
        except (EOFError, OSError):
            pass
        if not w.proc.is_alive():
            w.proc.join()
            self._recovery.lost(w, how_it_died(w.proc.exitcode))

    def _fail_all(self, message: str) -> None:
        tasks = self._queue.break_(message)
        for w in self._workers:
            tasks += list(w.tasks)
            w.tasks.clear()
        for t in tasks:
            t.fail(WorkerStartError(message))
