"""What a :class:`~deepfeat.data.workers.pool.SupervisedPool` does when a worker hangs or dies: kill
and replace it, report or retry (alone, once) the item it was on, requeue what waited behind it,
and fail every future when workers die before they are ready."""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

from deepfeat.data.workers.worker import WorkerLost, WorkerStartError

if TYPE_CHECKING:
    from deepfeat.data.workers.pool import _Worker

#: consecutive worker deaths before being ready that make the pool give up
MAX_START_FAILURES = 3


class RecoveryMixin:
    """:class:`~deepfeat.data.workers.pool.SupervisedPool`'s handling of hung and dead workers."""

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
