"""Test-only fault injection for the extraction pipeline (off unless an environment variable is set).

``DEEPFEAT_FAULTS`` holds comma-separated ``KIND=NAME`` rules; a rule fires for every
image whose file name contains NAME:

* ``decode-kill=NAME``: the decode worker process decoding it kills itself with SIGKILL
  (as the kernel's out-of-memory killer would);
* ``decode-hang=NAME``: the decode worker hangs (sleeps for an hour) on it;
* ``model-raise=NAME``: the network raises ``RuntimeError`` on any batch that holds it;
* ``commit-hang=N`` (N a number, not a name): before it commits a shard (of a store, or of a
  store's local-feature section), once it has committed
  N (0: before the first), the run says so on stderr (``fault: N shard(s) committed, waiting
  for a signal``) and waits for a signal, so that a test interrupts it at a known point (the
  store locked and planned, N shards committed) on any machine;
* ``sync-hang=STEP``: a sync (``extract --sync``, ``deepfeat sync``) says so on stderr
  (``fault: sync-hang after STEP, waiting for a signal``) and waits for a signal once it has
  done STEP: ``removed-changed`` or ``removed-deleted`` (the items tombstoned) or ``planned``
  (the new paths planned, nothing extracted yet);
* ``step-kill=STEP``: a removal or compaction of a store (``deepfeat remove``) kills its own
  process with SIGKILL right after the step named STEP (:mod:`deepfeat.store.compaction`:
  ``pending``, ``tombstones``, ``plan``, ``journal``, ``shard``, ``switched``, ``consolidated``,
  ``deleted``), so that a test finds the store as a crash at that point leaves it;
* ``serve-hang=NAME``: the server's decode of an upload whose file name contains NAME blocks
  (says so on stderr: ``fault: serve-hang on NAME``) until the server stops, like a decoder
  caught in a bad file: the work time bound and /api/health's stuck report are exercised.

Decode faults fire only in decode worker *processes* (``--decode-in processes``,
``--workers`` >= 1), never in the main process. The faults are fake; the recovery they
exercise (a replaced worker, a per-image timeout, a batch retried image by image) is the
real code path. ``tests/test_reliability.py`` and ``docs/reliability.md`` use them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from functools import lru_cache

ENV = "DEEPFEAT_FAULTS"
KINDS = ("decode-kill", "decode-hang", "model-raise", "commit-hang", "serve-hang", "sync-hang", "step-kill")

_committed = 0  # shards committed by this process (for commit-hang)
_released = threading.Event()  # set when the server stops: serve-hang ends


@lru_cache(maxsize=None)
def _rules(spec: str) -> tuple[tuple[str, str], ...]:
    out = []
    for part in spec.split(","):
        if not part.strip():
            continue
        kind, _, name = part.strip().partition("=")
        if kind not in KINDS or not name:
            raise ValueError(f"{ENV}: bad rule {part!r}; use KIND=NAME with KIND one of {', '.join(KINDS)}")
        if kind == "commit-hang" and not name.isdigit():
            raise ValueError(f"{ENV}: bad rule {part!r}; commit-hang takes a number of shards")
        out.append((kind, name))
    return tuple(out)


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def fires(kind: str, path: str) -> bool:
    """Whether a ``kind`` rule names the file *path*."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    base = os.path.basename(path)
    return any(k == kind and name in base for k, name in _rules(spec))


def decode_faults(path: str) -> None:
    """Called by a decode worker process before it decodes *path*."""
    if fires("decode-kill", path):
        os.kill(os.getpid(), signal.SIGKILL)
    if fires("decode-hang", path):
        time.sleep(3600)


def model_fault(paths) -> None:
    """Called before the network runs on a batch of *paths*."""
    for p in paths:
        if fires("model-raise", p):
            raise RuntimeError(f"injected fault: the model raises on {os.path.basename(p)}")


def serve_fault(name: str) -> None:
    """Called by the server's I/O pool before it decodes the upload named *name* (``serve-hang``)."""
    if fires("serve-hang", name):
        print(f"fault: serve-hang on {os.path.basename(name)}", file=sys.stderr, flush=True)
        _released.wait()


def release_hangs() -> None:
    """End every ``serve-hang`` (the server is stopping)."""
    _released.set()


def _wait_for_signal(message: str) -> None:
    print(f"fault: {message}, waiting for a signal", file=sys.stderr, flush=True)
    while True:
        signal.pause()  # returns after each handled signal; SIGINT and SIGTERM raise, SIGKILL ends it


def sync_step(step: str) -> None:
    """Called by a sync after each of its steps (``sync-hang=STEP``: wait for a signal after STEP)."""
    spec = os.environ.get(ENV)
    if spec and any(k == "sync-hang" and name == step for k, name in _rules(spec)):
        _wait_for_signal(f"sync-hang after {step}")


def before_commit() -> None:
    """Called before each shard the run commits (``commit-hang``: wait for a signal once N are)."""
    global _committed
    spec = os.environ.get(ENV)
    if not spec:
        return
    if any(k == "commit-hang" and int(n) == _committed for k, n in _rules(spec)):
        _wait_for_signal(f"{_committed} shard(s) committed")
    _committed += 1


def step_fault(step: str) -> None:
    """Called after each step of a removal or compaction (``step-kill``: SIGKILL after the step named)."""
    spec = os.environ.get(ENV)
    if spec and any(k == "step-kill" and name == step for k, name in _rules(spec)):
        os.kill(os.getpid(), signal.SIGKILL)
