"""Decode worker processes that a bad image cannot take down with the run.

:class:`SupervisedPool` is a :class:`~concurrent.futures.Executor` over ``spawn``-ed
worker processes, each fed through its own pipe (the task it runs and one queued behind
it) by a supervisor thread in the parent. For a *batch function* (one that carries a :class:`PerItem`
description, as :func:`deepfeat.pipeline.decode_batch` does) the worker sends back each
item's result as soon as it has it, so the parent always knows which item a worker is on
and for how long:

* **a hang**: an item that takes longer than *timeout* seconds gets its worker killed
  (SIGKILL) and replaced; the item is reported (``decode timed out after N s``) and the
  rest of the batch goes to another worker;
* **a death** (SIGKILL from the out-of-memory killer, a segfault in a decoder library):
  the worker is replaced and the item it was on is tried once more, alone, in a fresh
  worker; if that worker dies too, the item is reported with how it died, and the run
  goes on. A one-off death therefore loses nothing.

The results of a batch are delivered in order, whatever happened, so the store is the
same as that of a run without the fault (apart from the reported items). Other tasks
(plain functions) run whole in a worker; if their worker dies, their future raises
:class:`WorkerLost` and the worker is replaced. Workers that cannot even start (a script
that calls the library without ``if __name__ == "__main__":``) make every future raise
:class:`WorkerStartError` instead of restarting forever.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable

from ..errors import DeepfeatError


@dataclass(frozen=True)
class PerItem:
    """How a batch function ``fn(items)`` decomposes: ``one(item)`` runs in the worker,
    ``failed(item, reason)`` stands for an item that could not be done (in the parent),
    ``merge(results)`` turns the per-item results into what ``fn(items)`` returns."""

    one: Callable[[Any], Any]
    failed: Callable[[Any, str], Any]
    merge: Callable[[list], Any]


class WorkerLost(DeepfeatError):
    """The worker process running a (non-batch) task died."""


class WorkerStartError(DeepfeatError):
    """Worker processes die before they are ready."""


#: consecutive worker deaths before being ready that make the pool give up
MAX_START_FAILURES = 3


def _worker_main(conn, initializer: Callable | None, initargs: tuple) -> None:
    # the parent stops its workers itself (after a clean stop it kills them); a SIGINT or
    # SIGTERM sent to the whole process group must not kill them under a running batch
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)
    conn.send(("ready", None, None, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        tid, fn, args, per_item = msg
        try:
            if per_item:
                for k, item in enumerate(args):
                    conn.send(("item", tid, k, fn(item)))
                conn.send(("done", tid, None, None))
            else:
                conn.send(("done", tid, None, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - delivered to the parent's future
            try:
                conn.send(("error", tid, None, e))
            except Exception:  # the exception itself does not pickle
                conn.send(("error", tid, None, RuntimeError(f"{type(e).__name__}: {e}")))


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


def _how_it_died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exited with code {exitcode}"


class SupervisedPool(Executor):
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

    def _check_timeouts(self) -> None:
        if self.timeout is None:
            return
        now = time.monotonic()
        for w in list(self._workers):
            if w.task is not None and w.task.per_item and now - w.last > self.timeout:
                self._kill(w)
                self.stats["timeouts"] += 1
                self._replace(w)
                task = w.tasks.popleft()
                self._requeue(w)
                item = task.args[0][len(task.results)]
                task.results.append(task.per_item.failed(
                    item, f"decode timed out after {self.timeout:g} s (its worker was killed and replaced)"))
                self._chunk_done(task, None)

    def _lost(self, w: _Worker, how: str) -> None:
        """Worker *w* died: replace it, and retry or report what it was doing."""
        task, was_ready = (w.tasks.popleft() if w.tasks else None), w.ready
        self._requeue(w)
        self._replace(w)
        if not was_ready:
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                self._fail_all(
                    f"the decode worker processes die as they start ({how}). If you call deepfeat's extract() "
                    "from a script, put the call under `if __name__ == \"__main__\":` (Python's spawn start "
                    "method re-imports the script in each worker), or pass workers=0 / decode_in=\"threads\". "
                    "Committed shards are kept; run again to continue.")
            return
        if task is None:
            return
        self.stats["deaths"] += 1
        if not task.per_item:
            task.future.set_exception(WorkerLost(f"a decode worker process died ({how}) running {task.fn.__name__}"))
            return
        if task.alone:
            item = task.args[0][len(task.results)]
            task.results.append(task.per_item.failed(
                item, f"its decode worker process died twice on it ({how}); skipped"))
            self._chunk_done(task, None)
        else:
            task.alone = True  # the item it was on, once more, alone, in a fresh worker
            with self._lock:
                self._queue.appendleft(task)

    def _requeue(self, w: _Worker) -> None:
        """The tasks waiting behind a lost worker's current one go back to the queue's front, in order."""
        with self._lock:
            while w.tasks:
                self._queue.appendleft(w.tasks.pop())

    def _replace(self, w: _Worker) -> None:
        try:
            w.conn.close()
        except OSError:
            pass
        i = self._workers.index(w)
        with self._lock:
            stopping = self._stop
        if not stopping:
            self._workers[i] = self._spawn()
            self.stats["restarts"] += 1

    def _kill(self, w: _Worker) -> None:
        try:
            os.kill(w.proc.pid, signal.SIGKILL)
        except (OSError, TypeError):
            pass
        w.proc.join(timeout=10)

    def _kill_all(self) -> None:
        for w in self._workers:
            if w.proc.is_alive():
                try:
                    w.conn.send(None)
                except (OSError, EOFError, ValueError):
                    pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                self._kill(w)
            try:
                w.conn.close()
            except OSError:
                pass

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self._broken = message
            tasks = list(self._queue)
            self._queue.clear()
            self._stop = True
        for w in self._workers:
            tasks += list(w.tasks)
            w.tasks.clear()
        for t in tasks:
            if not t.future.done():
                t.future.set_exception(WorkerStartError(message))
