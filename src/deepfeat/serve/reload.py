"""A running server follows its store: another process syncs it (``deepfeat sync``,
``extract --sync``), removes items (``deepfeat remove``), extracts into it or rebuilds its index,
and the server notices and reloads, without a restart.

:class:`StoreWatcher` holds the current :class:`~deepfeat.serve.view.StoreView`. Before a
request (:class:`ReloadMiddleware`) it compares the store's
:func:`~deepfeat.serve.view.store_signature` (a few ``stat`` calls, at most every
``reload_check_s`` seconds) with the one of the current view; when it differs it opens the store
again in a worker thread (vectors, tombstones, index; the model is kept) and swaps the new view in
with one assignment. A request that already took a view keeps it to its end; requests that arrive
while a reload runs use the current view and do not wait.

It does not reload while a writer holds the store's lock (:func:`~deepfeat.store.lock.writer_active`:
an extraction, a removal or compaction with its index update): the store is read once the writer
is done, not half way. A reload that fails (a damaged file, an index being rewritten, a store
that now describes another model) keeps the current view and logs one line; it is tried again
when the store changes again, or after :data:`RETRY_S` seconds. ``/api/health`` and
``/api/info`` say which view answers and how the last check went.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from deepfeat.serve.view import StoreView, store_signature
from deepfeat.store.lock import writer_active

log = logging.getLogger(__name__)

#: a reload that failed is tried again after this many seconds even if the store did not change
RETRY_S = 30.0


class StoreWatcher:
    """The current view of the store at *store_path* and its reloads (module docstring).

    *open_view(generation)* opens a new :class:`StoreView`; *prepare(view, before)* readies it
    before it is swapped in (adopts the model, builds what the first search would); *check_s*:
    seconds between two checks (0: before every request; None: never)."""

    def __init__(self, store_path, open_view: Callable[[int], StoreView],
                 prepare: Callable[[StoreView, StoreView], None], check_s: float | None = 2.0):
        self.store_path = store_path
        self._open_view = open_view
        self._prepare = prepare
        self.check_s = check_s
        self.view = open_view(1)
        self._lock = threading.Lock()  # one reload at a time
        self._checked = time.monotonic()
        self._failed: tuple[tuple, float] | None = None  # (signature, when) of the last failed reload
        self.state: dict[str, Any] = {"status": "ok" if check_s is not None else "off", "reloads": 0,
                                      "failures": 0, "error": None, "writer": None}

    # -- the check (on the event loop: stat calls only) -------------------------------------

    def due(self) -> bool:
        """Whether the store changed since the current view was opened, checked at most every
        ``check_s`` seconds (and not while a reload runs)."""
        if self.check_s is None or self._lock.locked():
            return False
        now = time.monotonic()
        if now - self._checked < self.check_s:
            return False
        self._checked = now
        sig = store_signature(self.store_path)
        if sig == self.view.signature:
            return False
        # the same store that failed to load: wait for a change, or RETRY_S
        return self._failed is None or self._failed[0] != sig or now - self._failed[1] >= RETRY_S

    async def refresh(self) -> None:
        """Reload now, in a worker thread, if :meth:`due`."""
        if self.due():
            await asyncio.to_thread(self.reload)

    # -- the reload (in a worker thread) ---------------------------------------------------

    def reload(self) -> bool:
        """Open the store again and swap the new view in; True when it did. Never raises: a failure
        keeps the current view, logs one line and is recorded in :attr:`state`."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            sig = store_signature(self.store_path)
            if sig == self.view.signature:
                return False
            writer = writer_active(self.store_path)
            if writer is not None:
                if self.state["status"] != "waiting":
                    log.info("the store %s is being written (pid %s); serving it as it was until the writer is done",
                             self.store_path, writer.get("pid", "?"))
                self.state.update(status="waiting", writer=writer)
                return False
            before = self.view
            try:
                view = self._open_view(before.generation + 1)
                self._prepare(view, before)
            except Exception as e:  # noqa: BLE001 -- a store half written or damaged fails in many ways; serve on
                self._fail(sig, e)
                return False
            self.view = view  # one assignment: a request sees the old view or the new one, never a mix
            self._failed = None
            self.state.update(status="ok", reloads=self.state["reloads"] + 1, error=None, writer=None,
                              reloaded=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            log.info("the store %s changed: reloaded, %d items (were %d), index %s", self.store_path, view.count,
                     before.count, _index_kind(view))
            return True
        finally:
            self._lock.release()

    def _fail(self, sig: tuple, e: BaseException) -> None:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if self.state["error"] != msg:  # one line per distinct failure, not one per retry
            log.warning("the store %s changed but could not be reloaded (%s); still serving it as it was "
                        "(%d items); retrying when it changes again or in %g s", self.store_path, msg,
                        self.view.count, RETRY_S)
        self._failed = (sig, time.monotonic())
        self.state.update(status="failed", failures=self.state["failures"] + 1, error=msg, writer=None,
                          failed=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def describe(self) -> dict[str, Any]:
        """For /api/health and /api/info: the view answering, and the last reload's state."""
        out = {**self.view.describe(), **self.state, "check_seconds": self.check_s}
        return {k: v for k, v in out.items() if v is not None or k in ("error", "check_seconds")}


def _index_kind(view: StoreView) -> str:
    index = view.engine.index
    return index.meta.get("kind", "?") if index is not None else "exact (no saved index, or a stale one)"


class ReloadMiddleware:
    """Checks (:meth:`StoreWatcher.refresh`) before every HTTP request to the API and the views;
    static files and the page do not look at the store, and ``/api/health`` answers at once."""

    PREFIXES = ("/api/", "/map", "/duplicates")
    SKIP = ("/api/health",)

    def __init__(self, app, watcher: StoreWatcher):
        self.app = app
        self.watcher = watcher

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith(self.PREFIXES) and path not in self.SKIP:
            await self.watcher.refresh()
        return await self.app(scope, receive, send)
