"""The worker side of a :class:`~deepfeat.data.workers.pool.SupervisedPool`: the process's main loop
and the messages it sends (``ready``; then per task ``item`` results one by one for a batch
function, ``done`` or ``error``), the :class:`PerItem` description of a batch function, the
errors a pool's futures raise, and how a worker process ended."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Callable

from deepfeat.errors import DeepfeatError


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


def worker_main(conn, initializer: Callable | None, initargs: tuple) -> None:
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


def how_it_died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exited with code {exitcode}"
