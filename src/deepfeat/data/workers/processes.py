"""The decode worker processes as the parent sees them: :class:`WorkerHandle` (a process, its
pipe and the tasks sent to it) and :class:`WorkerSet`, which starts, replaces and stops them."""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from deepfeat.data.workers.tasks import Task
from deepfeat.data.workers.worker import worker_main

#: tasks in flight per worker: the one it runs and one queued behind it
PREFETCH = 2


@dataclass
class WorkerHandle:
    proc: Any
    conn: Any
    ready: bool = False
    #: tasks sent, in the order the worker runs them: the first is running, the next waits in
    #: its pipe (so the worker never idles for a round trip between two batches)
    tasks: deque = field(default_factory=deque)
    last: float = 0.0  # when the current item started (dispatch or the previous item's result)

    @property
    def task(self) -> Task | None:
        return self.tasks[0] if self.tasks else None

    @property
    def has_room(self) -> bool:
        return self.ready and len(self.tasks) < PREFETCH and self.proc.is_alive()


class WorkerSet:
    """*n* worker processes started with *ctx* (each runs *initializer(\\*initargs)* first)."""

    def __init__(self, n: int, ctx, initializer: Callable | None, initargs: tuple) -> None:
        self._ctx = ctx
        self._init, self._initargs = initializer, initargs
        self.handles: list[WorkerHandle] = [self._spawn() for _ in range(n)]

    def __iter__(self):
        return iter(list(self.handles))

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.handles if w.proc.pid is not None]

    def busy(self) -> bool:
        return any(w.task for w in self.handles)

    def _spawn(self) -> WorkerHandle:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, args=(child, self._init, self._initargs), daemon=True,
                                 name="deepfeat-decode")
        proc.start()
        child.close()
        return WorkerHandle(proc, parent)

    def replace(self, w: WorkerHandle) -> None:
        """A fresh worker in *w*'s place (*w*'s process is dead or killed)."""
        self.close_pipe(w)
        self.handles[self.handles.index(w)] = self._spawn()

    @staticmethod
    def close_pipe(w: WorkerHandle) -> None:
        try:
            w.conn.close()
        except OSError:
            pass

    @staticmethod
    def kill(w: WorkerHandle) -> None:
        try:
            os.kill(w.proc.pid, signal.SIGKILL)
        except (OSError, TypeError):
            pass
        w.proc.join(timeout=10)

    def stop_all(self, grace: float = 2.0) -> None:
        """Ask every worker to exit, then kill those still running after *grace* seconds."""
        for w in self.handles:
            if w.proc.is_alive():
                try:
                    w.conn.send(None)
                except (OSError, EOFError, ValueError):
                    pass
        deadline = time.monotonic() + grace
        for w in self.handles:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                self.kill(w)
            self.close_pipe(w)
