"""What a :class:`~deepfeat.data.workers.SupervisedPool` does when a worker hangs or dies:
:class:`WorkerRecovery` kills and replaces it, reports or retries (alone, once) the item it was
on, requeues what waited behind it, and gives up when workers die before they are ready."""

from __future__ import annotations

from typing import Callable

from deepfeat.data.workers.processes import WorkerHandle, WorkerSet
from deepfeat.data.workers.tasks import Task, TaskQueue
from deepfeat.data.workers.worker import WorkerLost, WorkerStartError

#: consecutive worker deaths before being ready that make the pool give up
MAX_START_FAILURES = 3


class WorkerRecovery:
    """The per-item timeout and the handling of hung and dead workers of one pool.

    *timeout*: seconds one item of a batch function may take (None: no limit), measured with
    *clock* (monotonic seconds). ``stats`` counts worker restarts, timed-out items and deaths
    of workers that were running a task; ``start_failures`` the workers that died in a row
    before they were ready.
    """

    def __init__(self, workers: WorkerSet, queue: TaskQueue, timeout: float | None,
                 clock: Callable[[], float]) -> None:
        self.workers = workers
        self.queue = queue
        self.timeout = timeout
        self.clock = clock
        self.stats = {"restarts": 0, "timeouts": 0, "deaths": 0}
        self.start_failures = 0

    # -- the per-item timeout ----------------------------------------------------

    def item_started(self, w: WorkerHandle) -> None:
        """*w* starts an item (or a task) now."""
        w.last = self.clock()

    def worker_ready(self, w: WorkerHandle) -> None:
        w.ready = True
        self.start_failures = 0

    def seconds_to_next_check(self, cap: float = 1.0) -> float:
        """How long the supervisor may wait before the next item could time out (at most *cap*)."""
        if self.timeout is None:
            return cap
        now = self.clock()
        left = [w.last + self.timeout - now for w in self.workers if w.task and w.task.per_item]
        return max(0.01, min([cap] + left))

    def check_timeouts(self) -> None:
        """Kill and replace each worker whose item has run past the timeout; the item is reported
        as failed and the rest of its batch goes on (see :meth:`chunk_ended`)."""
        if self.timeout is None:
            return
        now = self.clock()
        for w in self.workers:
            if w.task is not None and w.task.per_item and now - w.last > self.timeout:
                self.workers.kill(w)
                self.stats["timeouts"] += 1
                task = w.tasks.popleft()
                self._requeue_waiting(w)
                self._replace(w)
                task.results.append(task.per_item.failed(
                    task.current_item,
                    f"decode timed out after {self.timeout:g} s (its worker was killed and replaced)"))
                self.chunk_ended(task)

    # -- a dead worker ---------------------------------------------------------------

    def lost(self, w: WorkerHandle, how: str) -> None:
        """Worker *w* died (*how*: as :func:`~deepfeat.data.workers.worker.how_it_died` says):
        replace it, and retry or report what it was doing. Raises :class:`WorkerStartError`
        when workers keep dying before they are ready."""
        task, was_ready = (w.tasks.popleft() if w.tasks else None), w.ready
        self._requeue_waiting(w)
        self._replace(w)
        if not was_ready:
            self.start_failures += 1
            if self.start_failures >= MAX_START_FAILURES:
                raise WorkerStartError(
                    f"the decode worker processes die as they start ({how}). If you call deepfeat's extract() "
                    "from a script, put the call under `if __name__ == \"__main__\":` (Python's spawn start "
                    "method re-imports the script in each worker), or pass workers=0 / decode_in=\"threads\". "
                    "Committed shards are kept; run again to continue.")
            return
        if task is None:
            return
        self.stats["deaths"] += 1
        if not task.per_item:
            task.fail(WorkerLost(f"a decode worker process died ({how}) running {task.fn.__name__}"))
        elif task.alone:
            task.results.append(task.per_item.failed(
                task.current_item, f"its decode worker process died twice on it ({how}); skipped"))
            self.chunk_ended(task)
        else:
            task.alone = True  # the item it was on, once more, alone, in a fresh worker
            self.queue.put_front([task])

    def chunk_ended(self, task: Task, result=None) -> None:
        """*task*'s chunk ended: complete it, or queue the rest of its batch again (first in line)."""
        if not task.end_chunk(result):
            self.queue.put_front([task])

    def _requeue_waiting(self, w: WorkerHandle) -> None:
        """The tasks waiting behind a lost worker's current one go back to the queue's front, in order."""
        waiting = list(w.tasks)
        w.tasks.clear()
        self.queue.put_front(waiting)

    def _replace(self, w: WorkerHandle) -> None:
        if self.queue.stopped:
            self.workers.close_pipe(w)
            return
        self.workers.replace(w)
        self.stats["restarts"] += 1
