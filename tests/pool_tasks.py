"""Tiny tasks for tests of deepfeat.data.workers, in their own module so that spawned
workers import only this (no torch): each item is a file name in a scratch folder."""

from __future__ import annotations

import os
import signal
import time

from deepfeat.data.workers import PerItem


def _one(item: str) -> str:
    name = os.path.basename(item)
    if name.startswith("kill-once") and not os.path.exists(item + ".seen"):
        open(item + ".seen", "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("kill-always"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("hang"):
        time.sleep(3600)
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
