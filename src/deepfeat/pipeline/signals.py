"""SIGTERM as a clean stop: ``with sigterm_interrupts():`` turns SIGTERM into :class:`Terminated`.

:class:`Terminated` is a :class:`KeyboardInterrupt`, so everything that already stops
cleanly on Ctrl-C (the extraction keeps its committed shards and shuts its workers down)
does the same when a service manager, ``kill`` or a batch scheduler asks the process to
stop. The CLI exits 143 (128 + 15) for it and 130 for Ctrl-C.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
