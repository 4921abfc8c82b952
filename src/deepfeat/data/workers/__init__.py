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

The package: the worker process (:mod:`deepfeat.data.workers.worker`), the pool and its
supervisor thread (:mod:`deepfeat.data.workers.pool`), what the supervisor does when a worker
hangs or dies (:mod:`deepfeat.data.workers.recovery`).
Every name is importable from ``deepfeat.data.workers`` as before.
"""

from __future__ import annotations

from deepfeat.data.workers.pool import PREFETCH, SupervisedPool, _Task, _Worker
from deepfeat.data.workers.recovery import MAX_START_FAILURES
from deepfeat.data.workers.worker import PerItem, WorkerLost, WorkerStartError, _how_it_died, _worker_main
