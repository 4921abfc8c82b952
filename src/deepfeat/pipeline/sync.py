"""Keeping a store in line with the folders it was made from (``extract --sync``, ``deepfeat sync``).

:func:`scan_inputs` compares the inputs (as :func:`~deepfeat.data.images.discover` finds them
now) with the store's items and their file records (``size``, ``mtime_ns``, ``sha256``:
:mod:`deepfeat.data.sources`): a file the store does not know is *added*; a known file whose
size or modification time differs is hashed, and is *changed* when its bytes are not the ones it
was extracted from (a failed item whose file changed is *retried*); a known file under the
inputs that is gone is *deleted*; everything else is *unchanged* (or still *failed*). An item
written before the records existed is taken as unchanged while its file exists (counted as
*unchecked*). :func:`apply_sync` then tombstones the changed, retried and deleted items
(:func:`deepfeat.store.removal.remove_items`, which also drops them from the plan) and returns
the paths to plan, which the extraction plans under new ids and extracts as usual.

Every step is atomic and the diff is a function of the folder and the store only, so a sync
killed at any point and run again (or ``extract --resume``) ends with the same store as one
that was never interrupted: tombstones written before a kill make those paths *added* on the
next scan, and paths planned before a kill are *pending* and extracted by the plan.

:func:`stale_warning` is the cheap check of a plain re-run (``stat`` only, no hashing).
"""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from deepfeat.data.images import discover, file_problem, printable_path
from deepfeat.data.sources import SourceRecord, readable_sha256
from deepfeat.pipeline import faults
from deepfeat.pipeline.hashcache import HashCache, same_file_state
from deepfeat.pipeline.plan import store_form
from deepfeat.store import FeatureStore
from deepfeat.store.items import source_records

log = logging.getLogger(__name__)

#: what the report lists, in this order
CATEGORIES = ("added", "changed", "deleted", "unchanged", "failed", "retried", "pending")


@dataclass
class SyncPlan:
    """The difference between a store and its inputs, and what syncing does about it.

    Each category is a list of paths (as the store spells them); ``remove`` holds the
    (id, reason) pairs to tombstone and ``to_plan`` the paths to extract, in the order
    :func:`~deepfeat.data.images.discover` finds them (the order of a fresh extraction)."""

    inputs: list[str]
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # failed before, file unchanged: left as they are
    retried: list[str] = field(default_factory=list)  # failed before, file changed: extracted again
    pending: list[str] = field(default_factory=list)  # planned by an earlier run, not extracted yet
    unchecked: int = 0  # items without a file record (stores written before they existed)
    hashed: int = 0  # files whose stat differed, read and hashed to decide
    hash_cached: int = 0  # files whose stat differed, decided by the hash cache (pipeline.hashcache): not read
    seconds: dict[str, float] = field(default_factory=dict)  # "scan" (hashing included), "remove"
    remove: list[tuple[int, str]] = field(default_factory=list)
    to_plan: list[str] = field(default_factory=list)

    @property
    def changes(self) -> int:
        return len(self.remove) + len(self.to_plan)

    def counts(self) -> dict[str, int]:
        return {c: len(getattr(self, c)) for c in CATEGORIES}

    def summary(self) -> str:
        """One line: ``2 added, 1 changed, 1 deleted, 3 unchanged, 0 failed`` (and retried, pending,
        unchecked where there are any)."""
        c = self.counts()
        parts = [f"{c[k]} {k}" for k in CATEGORIES if k in ("added", "changed", "deleted", "unchanged", "failed")
                 or c[k]]
        if self.unchecked:
            parts.append(f"{self.unchecked} could not be checked (extracted before deepfeat recorded its files; "
                         "taken as unchanged while the file exists)")
        return ", ".join(parts)

    def to_dict(self, paths: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {"inputs": self.inputs, "counts": self.counts(), "unchecked": self.unchecked,
                             "hashed": self.hashed, "hash_cached": self.hash_cached,
                             "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}
        if paths:
            d["paths"] = {c: getattr(self, c) for c in CATEGORIES}
        return d


# -- inputs ---------------------------------------------------------------------------------


def record_inputs(store: FeatureStore, inputs: Sequence[str]) -> None:
    """Merge *inputs* (folders, files, globs, ``@list.txt``) into ``meta["inputs"]``, spelled
    like item paths (relative to the store's root), so that ``deepfeat sync STORE`` knows what
    to scan."""
    root = store.meta.get("root")
    have = list(store.meta.get("inputs") or [])
    for item in inputs:
        item = os.fspath(item)
        at = item.startswith("@")
        spelled = ("@" if at else "") + store_form([os.path.normpath(item[1:] if at else item)], root)[0]
        if spelled not in have:
            have.append(spelled)
    if have != store.meta.get("inputs"):
        store.update_meta(inputs=have)


def recorded_inputs(store: FeatureStore) -> list[str]:
    """The store's recorded inputs as paths usable from here: resolved against its root, and
    relative ones kept relative (to the working directory), so that the files found in them are
    spelled as the extraction spelled them."""
    out = []
    for item in store.meta.get("inputs") or []:
        at = item.startswith("@")
        p = item[1:] if at else item
        resolved = store.resolve_path(p)
        out.append(("@" if at else "") + (resolved if os.path.isabs(p) else os.path.relpath(resolved)))
    return out


class _Scope:
    """Which files the inputs cover: under a folder, a file or list entry, or matching a glob."""

    def __init__(self, inputs: Sequence[str], files: Sequence[str]):
        self.folders, self.patterns = [], []
        for item in inputs:
            if item.startswith("@"):
                continue
            if os.path.isdir(item):
                self.folders.append(os.path.realpath(item).rstrip(os.sep) + os.sep)
            elif glob.has_magic(item):
                self.patterns.append(os.path.abspath(item))
        self.files = set(map(_RealPaths(), files))

    def covers(self, real: str) -> bool:
        return (real in self.files or any(real.startswith(f) for f in self.folders)
                or any(fnmatch.fnmatchcase(real, p) for p in self.patterns))


class _RealPaths:
    """``os.path.realpath`` of many files, each folder resolved once (a file that is itself a
    symbolic link is resolved whole): the keys by which a sync matches items to files."""

    def __init__(self) -> None:
        self.folders: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        if os.path.islink(path):
            return os.path.realpath(path)
        head, name = os.path.split(os.path.abspath(path))
        folder = self.folders.get(head)
        if folder is None:
            folder = self.folders[head] = os.path.realpath(head)
        return os.path.join(folder, name)


def _missing(path: str) -> bool:
    return file_problem(path) in ("file not found", "broken symbolic link")


# -- the diff ----------------------------------------------------------------------------------


def scan_inputs(store: FeatureStore, inputs: Sequence[str], threads: int = 4, hashes: HashCache | None = None
                ) -> SyncPlan:
    """The :class:`SyncPlan` of *store* against *inputs* (paths usable from here); changes nothing in the
    store. *hashes*: the file-hash cache (:mod:`deepfeat.pipeline.hashcache`) to take and keep hashes in."""
    t0 = time.perf_counter()
    root = store.meta.get("root")
    plan = SyncPlan(inputs=[("@" if i.startswith("@") else "") + store_form([i.removeprefix("@")], root)[0]
                            for i in inputs])
    items = store.items()
    removed = set(store.removed_ids().tolist())
    real_of = _RealPaths()
    known: dict[str, tuple[int, str, str, SourceRecord | None]] = {}
    for i, p, status, record in zip(items.column("id").to_pylist(), items.column("path").to_pylist(),
                                    items.column("status").to_pylist(), source_records(items)):
        if i not in removed:
            known[real_of(store.resolve_path(p))] = (i, p, status, record)
    # an input that named one file of the store, now gone: that file is deleted, not "input not found"
    gone = [i for i in inputs if not i.startswith("@") and not glob.has_magic(i) and not os.path.lexists(i)
            and real_of(i) in known]
    inputs = [i for i in inputs if i not in gone]
    files = [printable_path(p) for p in discover(inputs)] if inputs else []
    spelled = store_form(files, root)
    pending = _pending(store, removed, real_of)
    seen: set[str] = set()
    to_hash = []
    reals = [real_of(store.resolve_path(s)) for s in spelled]
    for real, s in zip(reals, spelled):
        seen.add(real)
        if real in pending:
            plan.pending.append(s)
            continue
        it = known.get(real)
        if it is None:
            plan.added.append(s)
            plan.to_plan.append(real)
            continue
        item_id, path, status, record = it
        try:
            st = os.stat(real)
        except OSError:
            if _missing(real):
                seen.discard(real)  # a list entry whose file is gone: deleted below
            else:
                (plan.unchanged if status == "ok" else plan.failed).append(path)
            continue
        if record is None:
            _unrecorded(plan, real, it)
        elif record.same_stat(st):  # SourceRecord.unchanged's first step, without a thread
            (plan.unchanged if status == "ok" else plan.failed).append(path)
        else:
            to_hash.append((real, st, it))
    _decide_by_hash(plan, to_hash, threads, hashes)
    # extracted in the order they are found (a fresh extraction's order), whatever made them due
    due = set(plan.to_plan)
    plan.to_plan = [s for real, s in zip(reals, spelled) if real in due]
    scope = _Scope(inputs, [*files, *gone])
    moved = bool(root) and not os.path.isdir(root)
    for real, (item_id, path, *_rest) in known.items():
        # a store whose root is gone resolves relative paths against the working directory, where
        # the file of a deleted item is as missing as in the old root: either place counts
        places = [real, real_of(path)] if moved and not os.path.isabs(path) else [real]
        if real not in seen and any(map(scope.covers, places)) and all(map(_missing, places)):
            plan.deleted.append(path)
            plan.remove.append((item_id, "deleted"))
    plan.seconds["scan"] = time.perf_counter() - t0
    return plan


def _pending(store: FeatureStore, removed: set[int], real_of: _RealPaths) -> set[str]:
    """The files planned by an earlier run whose shards are not committed yet."""
    table = store.read_plan()
    if table is None:
        return set()
    committed = set(store.committed_shards())
    return {real_of(store.resolve_path(p))
            for i, p, s in zip(table.column("id").to_pylist(), table.column("path").to_pylist(),
                               table.column("shard").to_pylist()) if s not in committed and i not in removed}


def _unrecorded(plan: SyncPlan, real: str, it: tuple) -> None:
    """An item from before the file records: an ok one is taken as unchanged (its file exists); a
    failed one is tried again once (it then has a record)."""
    item_id, path, status = it[:3]
    if status == "ok":
        plan.unchecked += 1
        plan.unchanged.append(path)
    else:
        plan.retried.append(path)
        plan.remove.append((item_id, "changed"))
        plan.to_plan.append(real)


def _decide_by_hash(plan: SyncPlan, to_hash: list[tuple[str, os.stat_result, tuple]], threads: int,
                    hashes: HashCache | None = None) -> None:
    """Decide the files whose stat differs from their record by their bytes
    (:meth:`~deepfeat.data.sources.SourceRecord.unchanged`: the hash from *hashes* when it knows the
    file at this stat, else read in threads, hashlib releasing the GIL, and kept there) and sort them
    into changed, retried, unchanged or failed."""
    if not to_hash:
        return
    digests = {real: hashes.get(real, st) for real, st, _ in to_hash} if hashes is not None else {}
    read = [(real, st) for real, st, _ in to_hash if digests.get(real) is None]
    plan.hashed, plan.hash_cached = len(read), len(to_hash) - len(read)

    def digest(job: tuple[str, os.stat_result]) -> tuple[str | None, bool]:
        """The file's sha256, and whether it still has the stat it was found with (only then kept)."""
        real, st = job
        h = readable_sha256(real)
        try:
            return h, h is not None and same_file_state(os.stat(real), st)
        except OSError:
            return h, False

    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        found = list(ex.map(digest, read))
    digests.update((real, h) for (real, _), (h, _) in zip(read, found))
    if hashes is not None:
        hashes.put((real, st, h) for (real, st), (h, keep) in zip(read, found) if keep)
    for real, st, (item_id, path, status, record) in to_hash:
        unchanged = record.unchanged(st, lambda real=real: digests.get(real))
        if unchanged:
            (plan.unchanged if status == "ok" else plan.failed).append(path)
            continue
        (plan.changed if status == "ok" else plan.retried).append(path)
        plan.remove.append((item_id, "changed"))
        plan.to_plan.append(real)


# -- applying it -------------------------------------------------------------------------------


def apply_sync(store: FeatureStore, plan: SyncPlan) -> list[str]:
    """Tombstone the changed, retried and deleted items (and drop them from the plan), and return
    the paths to plan (new ids, new shards). The caller holds the store's writer lock."""
    from deepfeat.store.removal import remove_items

    t0 = time.perf_counter()
    for reason in ("changed", "deleted"):
        ids = [i for i, r in plan.remove if r == reason]
        if ids:
            remove_items(store, ids, reason=reason)
            faults.sync_step(f"removed-{reason}")
    plan.seconds["remove"] = time.perf_counter() - t0
    return list(plan.to_plan)


# -- the warning of a plain re-run -------------------------------------------------------------------


def stale_warning(store: FeatureStore, inputs: Sequence[str], cmd_store: str, hashes: HashCache | None = None
                  ) -> str | None:
    """One line when files of *inputs* that the store knows changed (size or mtime) or are gone
    since they were extracted, else None. ``stat`` only: cheap on a large re-run; a file whose stat
    differs but whose hash *hashes* knows at this stat to be the recorded one (a sync read it) is
    not counted."""
    folders = [os.path.abspath(p).rstrip(os.sep) + os.sep for p in inputs if not p.startswith("@")
               and os.path.isdir(p)]
    files = {os.path.abspath(p) for p in inputs if not p.startswith("@") and os.path.isfile(p)}
    if not folders and not files:
        return None
    items = store.items()
    removed = set(store.removed_ids().tolist())
    changed = missing = 0
    for i, p, record in zip(items.column("id").to_pylist(), items.column("path").to_pylist(), source_records(items)):
        f = os.path.abspath(store.resolve_path(p))
        if i in removed or not (f in files or any(f.startswith(d) for d in folders)):
            continue
        try:
            st = os.stat(f)
        except FileNotFoundError:
            missing += 1
            continue
        except OSError:
            continue
        if record is not None and not record.same_stat(st) and not (
                hashes is not None and hashes.get(os.path.realpath(f), st) == record.sha256):
            changed += 1
    if not changed and not missing:
        return None
    parts = []
    if changed:
        parts.append(f"{changed} file{'s' if changed != 1 else ''} changed")
    if missing:
        n = f"{missing} file{'s' if missing != 1 else ''}" if not changed else f"{missing}"
        parts.append(f"{n} {'is' if missing == 1 else 'are'} missing")
    it = "it was" if changed + missing == 1 else "they were"
    return (f"{' and '.join(parts)} since {it} extracted; run with --sync to update the store "
            f"(or `deepfeat sync {cmd_store}`)")
