"""The parent's side of the work: :class:`Task` (one submitted call, with the per-item results
of a batch function so far) and :class:`TaskQueue`, the queue that the user's thread fills and the
supervisor thread empties, with the pool's lifecycle (draining, stopped, broken) under one lock."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from deepfeat.data.workers.worker import PerItem


@dataclass
class Task:
    """One call submitted to the pool, from submission to its future's result."""

    id: int
    fn: Callable
    args: tuple
    future: Future
    per_item: PerItem | None = None
    results: list = field(default_factory=list)  # per-item results so far
    alone: bool = False  # the next item is being retried alone after its worker died
    sent: int = 0  # items in the chunk now dispatched

    @property
    def items(self) -> list:
        """A batch function's items (all of them, done or not)."""
        return self.args[0]

    @property
    def current_item(self) -> Any:
        """The item a worker is on: the first without a result."""
        return self.items[len(self.results)]

    def message(self) -> tuple:
        """What a worker receives for the next chunk: ``(id, fn, args, per_item)``. A batch
        function's chunk is the items without a result (only the first when retried alone)."""
        if not self.per_item:
            return (self.id, self.fn, self.args, False)
        items = self.items[len(self.results):]
        if self.alone:
            items = items[:1]
        self.sent = len(items)
        return (self.id, self.per_item.one, items, True)

    def end_chunk(self, result: Any = None) -> bool:
        """The chunk sent to a worker ended (*result*: a plain function's return value).
        True when the task is complete and its future set; False when the rest of a batch
        (after an item retried alone or reported) must be queued again."""
        if not self.per_item:
            self.future.set_result(result)
            return True
        self.alone = False
        if len(self.results) < len(self.items):
            return False
        self.future.set_result(self.per_item.merge(self.results))
        return True

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class TaskQueue:
    """Tasks waiting for a worker, shared by the user's thread and the supervisor thread.

    ``draining``: no new tasks; stop once the queued and running ones are done.
    ``stopped``: stop now. ``broken``: why the pool gave up (every new task fails with it).
    """

    def __init__(self) -> None:
        self._tasks: deque[Task] = deque()
        self._lock = threading.Lock()
        self.draining = False
        self.stopped = False
        self.broken: str | None = None

    def put(self, task: Task) -> bool:
        """Queue *task*; False when the pool is broken (the caller fails the task)."""
        with self._lock:
            if self.stopped or self.draining:
                raise RuntimeError("cannot submit to a pool that is shutting down")
            if self.broken:
                return False
            self._tasks.append(task)
            return True

    def put_front(self, tasks: list[Task]) -> None:
        """Put *tasks* back at the front of the queue, in their order (they ran before the rest)."""
        with self._lock:
            self._tasks.extendleft(reversed(tasks))

    def pop(self) -> Task | None:
        with self._lock:
            return self._tasks.popleft() if self._tasks else None

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._tasks)

    def close(self, *, drain: bool, cancel: bool) -> None:
        """Stop taking tasks: *drain* (finish what was submitted) or stop now; *cancel*: cancel the queued ones."""
        with self._lock:
            if cancel:
                while self._tasks:
                    self._tasks.popleft().future.cancel()
            if drain:
                self.draining = True
            else:
                self.stopped = True

    def break_(self, message: str) -> list[Task]:
        """Give up: stop, remember why, and return the queued tasks (for the caller to fail)."""
        with self._lock:
            self.broken = message
            self.stopped = True
            tasks = list(self._tasks)
            self._tasks.clear()
            return tasks
