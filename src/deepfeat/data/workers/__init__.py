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

The package: the worker process, its messages and the errors a pool raises
(:mod:`deepfeat.data.workers.worker`); the parent's record of tasks and their queue
(:mod:`deepfeat.data.workers.tasks`) and of the worker processes
(:mod:`deepfeat.data.workers.processes`); :class:`~deepfeat.data.workers.recovery.WorkerRecovery`,
what the pool does when a worker hangs or dies (:mod:`deepfeat.data.workers.recovery`); and the
pool with its supervisor thread (:mod:`deepfeat.data.workers.pool`).
"""

from __future__ import annotations

from deepfeat.data.workers.pool import SupervisedPool
from deepfeat.data.workers.worker import PerItem, WorkerLost, WorkerStartError

__all__ = ["PerItem", "SupervisedPool", "WorkerLost", "WorkerStartError"]
