"""Tiny tasks for tests of deepfeat.data.workers, in their own module so that spawned
workers import only this (no torch): each item is a file name in a scratch folder.

An item named ``hang*`` blocks forever; it first counts itself in the shared counter that
:func:`count_hangs_in` gave the worker, so a test's clock knows a hang has begun."""

from __future__ import annotations

import os
import signal
import threading

from deepfeat.data.workers import PerItem

_hangs = None  # a multiprocessing.Value: hang items begun (set in the worker by count_hangs_in)


def count_hangs_in(counter) -> None:
    """Worker initializer: count the hang items begun in *counter* (a shared ``Value("i")``)."""
    global _hangs
    _hangs = counter


def _one(item: str) -> str:
    name = os.path.basename(item)
    if name.startswith("kill-once") and not os.path.exists(item + ".seen"):
        open(item + ".seen", "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("kill-always"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("hang"):
        if _hangs is not None:
            with _hangs.get_lock():
                _hangs.value += 1
        threading.Event().wait()  # forever: only the pool's timeout ends it
    return f"ok:{name}"


def _failed(item: str, reason: str) -> str:
    return f"failed:{os.path.basename(item)}:{reason}"


def batch(items: list[str]) -> list[str]:
    return [_one(i) for i in items]


batch.per_item = PerItem(_one, _failed, list)


def whole(x: int) -> int:
    if x < 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return x * 2


def broken_init() -> None:
    raise RuntimeError("this worker cannot start")
