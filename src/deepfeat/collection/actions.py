"""Acting on duplicate groups safely: move (or delete) every member but the keeper, with a
manifest written first and an undo that restores byte-identical files.

The protocol (docs/duplicates.md, "Acting safely"):

1. **plan**: one entry per removable member (never a keeper): its file, where it goes
   (``--move-to DIR``: the stored path's folders are kept under DIR, so two ``img.jpg``
   of different folders never collide), and what it was when the duplicates were found
   (bytes, mtime, sha256), with what the store recorded of it when it was extracted;
2. **manifest first**: the plan is written atomically (fsynced) before any file is touched;
3. **check**: a file that changed since it was extracted (its features are stale) or since
   the duplicates were found, whose keeper is gone, or whose destination exists, is skipped,
   with the reason in the journal. "Changed" is the rule of ``deepfeat sync``,
   :meth:`deepfeat.data.sources.SourceRecord.unchanged`, against the store's record of the
   file (``size``, ``mtime_ns``, ``sha256``) and against the plan, with the bytes always
   compared (``trust_stat=False``: a file is about to be deleted or moved, and the check
   hashes it once): a touched file with the same bytes is acted on, an edited one is not,
   even with its size and mtime put back. A row from a store extracted before the records
   existed falls back to its modification time against its shard's: later is stale;
4. **move**: ``os.rename`` (atomic: the file is at its old name or its new one, never
   neither); across file systems a copy to a temporary name, fsync, rename, then the
   source is removed (a kill leaves at most a second copy, which undo removes);
5. **journal**: each outcome is appended to ``MANIFEST.log`` and fsynced.

Undo reads the manifest (not only the journal): every planned file found at its
destination and missing from its source is moved back and its sha256 checked, so a
``kill -9`` at any point loses nothing. ``--delete`` removes files for good (the CLI asks
for ``--yes``): its manifest, written first like a move's, lists every file it may delete
with its sha256, and undo says it cannot restore those.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from functools import cache, partial
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deepfeat.collection.duplicates import DuplicateReport
from deepfeat.data.sources import SourceRecord, file_sha256, readable_sha256
from deepfeat.errors import UsageError
from deepfeat.store import atomic_write_bytes

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "deepfeat-duplicates-manifest"
#: test-only fault hook: ``NAME:STAGE`` kills this process (SIGKILL) at STAGE ("moved": after the
#: rename, before the journal line; "copied": after a cross-device copy, before its rename;
#: "deleted": after a delete, before the journal line) of the first file whose name contains NAME
FAULT_ENV = "DEEPFEAT_DUPLICATES_KILL_AT"


@dataclass
class Entry:
    """One planned action: a duplicate's file and where it goes."""

    path: str  # as stored
    file: str  # absolute, where it is now
    dest: str | None  # absolute, where it goes (None: delete)
    keeper: str  # the keeper's absolute file
    bytes: int
    mtime_ns: int
    sha256: str
    extracted_ns: int  # when its store shard was written (the rule of stores without records)
    recorded: SourceRecord | None = None  # the file as the store extracted it (None: an older store)

    def __post_init__(self) -> None:
        if isinstance(self.recorded, dict):  # read back from a manifest
            self.recorded = SourceRecord(**self.recorded)


@dataclass
class Outcome:
    file: str
    state: str  # moved | deleted | skipped | would-move | would-delete | restored | ...
    reason: str = ""


def plan(report: DuplicateReport, move_to: str | os.PathLike | None) -> list[Entry]:
    """The entries for every removable member of the report's groups (module docstring, 1).
    Destinations keep each file's folders below the folder common to every member."""
    base = None if move_to is None else Path(move_to).resolve()
    keepers = {os.path.abspath(report.files[g.keeper].file) for g in report.groups}
    members = [os.path.abspath(report.files[r].file) for g in report.groups for r in g.rows]
    common = os.path.dirname(os.path.commonpath(members)) if len(members) == 1 else os.path.commonpath(members)
    out = []
    for g in report.groups:
        keeper = os.path.abspath(report.files[g.keeper].file)
        for r in g.removable:
            f = report.files[r]
            src = os.path.abspath(f.file)
            if src in keepers:  # the same file is another group's keeper: never touched
                continue
            dest = None if base is None else str(base / os.path.relpath(src, common))
            out.append(Entry(f.path, src, dest, keeper, f.bytes, f.mtime_ns, f.sha256, f.extracted_ns, f.recorded))
    return out


def _why_skip(e: Entry) -> str | None:
    try:
        st = os.stat(e.file)
    except FileNotFoundError:
        return "missing"
    if not os.path.exists(e.keeper):
        return f"its keeper {e.keeper} is missing"
    digest = cache(partial(readable_sha256, e.file))  # read once for both checks
    if digest() is None:
        return "cannot be read"
    if not SourceRecord(e.bytes, e.mtime_ns, e.sha256).unchanged(st, digest, trust_stat=False):
        return "changed since the duplicates were found (its bytes differ)"
    if e.recorded is not None:
        if not e.recorded.unchanged(st, digest, trust_stat=False):
            return ("changed since it was extracted: its bytes are not the ones the store's features describe; "
                    "run deepfeat sync on the store, then look for duplicates again")
    elif max(st.st_mtime_ns, e.mtime_ns) > e.extracted_ns:
        return ("modified after it was extracted, so its features may be stale; the store is older than deepfeat's "
                "file records, so a touch cannot be told from an edit")
    if e.dest is not None and os.path.lexists(e.dest):
        return f"destination {e.dest} exists"
    return None


def _fault(name: str, stage: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec:
        want, _, at = spec.rpartition(":")
        if at == stage and want and want in os.path.basename(name):
            os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_file(src: str, dest: str) -> None:
    """Move *src* to *dest* (not existing) so that a kill leaves it at one of them, at least."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        os.rename(src, dest)
    except OSError as e:
        if e.errno != 18:  # EXDEV: another file system
            raise
        tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.tmp-{os.getpid()}")
        shutil.copy2(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _fault(src, "copied")
        os.rename(tmp, dest)
        _fsync_dir(os.path.dirname(dest))
        os.unlink(src)
    _fsync_dir(os.path.dirname(dest))


class Journal:
    """``MANIFEST.log``: one JSON line per outcome, fsynced as written."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, o: Outcome) -> None:
        self._f.write(json.dumps(asdict(o)) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def default_manifest(move_to: str | None, store: str) -> Path:
    where = Path(move_to) if move_to else Path(store)
    return where / f"duplicates-{time.strftime('%Y%m%d-%H%M%S')}.manifest.json"


def apply(report: DuplicateReport, move_to: str | None = None, delete: bool = False, dry_run: bool = False,
          manifest: str | os.PathLike | None = None,
          on_outcome: Callable[[Outcome], None] | None = None) -> tuple[Path | None, list[Outcome]]:
    """Move (or delete) every removable member of *report* (module docstring). Returns the
    manifest written (None for a dry run) and the outcomes."""
    if (move_to is None) == (not delete):
        raise UsageError("give exactly one of --move-to DIR or --delete")
    entries = plan(report, move_to)
    outcomes = []
    if dry_run:
        for e in entries:
            why = _why_skip(e)
            o = Outcome(e.file, "skipped" if why else ("would-delete" if delete else "would-move"),
                        why or (e.dest or ""))
            outcomes.append(o)
            if on_outcome:
                on_outcome(o)
        return None, outcomes
    mpath = Path(manifest) if manifest else default_manifest(move_to, report.store)
    if mpath.exists():
        raise UsageError(f"manifest {mpath} exists; give another --manifest")
    mpath.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": MANIFEST_FORMAT, "version": 1, "action": "delete" if delete else "move", "store": report.store,
           "move_to": None if move_to is None else str(Path(move_to).resolve()),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "entries": [asdict(e) for e in entries]}
    atomic_write_bytes(mpath, (json.dumps(doc, indent=1) + "\n").encode())
    journal = Journal(mpath.with_name(mpath.name + ".log"))
    try:
        for e in entries:
            why = _why_skip(e)
            if why:
                o = Outcome(e.file, "skipped", why)
            elif delete:
                os.unlink(e.file)
                _fault(e.file, "deleted")
                o = Outcome(e.file, "deleted")
            else:
                move_file(e.file, e.dest)
                _fault(e.file, "moved")
                o = Outcome(e.file, "moved", e.dest)
            journal.write(o)
            outcomes.append(o)
            if on_outcome:
                on_outcome(o)
    finally:
        journal.close()
    return mpath, outcomes


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the manifest {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise UsageError(f"{path} is not a deepfeat duplicates manifest")
    return doc


def undo(manifest: str | os.PathLike, on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Put back every file the manifest moved, checked byte for byte (module docstring)."""
    doc = read_manifest(manifest)
    outcomes = []
    for raw in doc["entries"]:
        e = Entry(**raw)
        here, there = os.path.exists(e.file), e.dest is not None and os.path.exists(e.dest)
        if doc["action"] == "delete":
            o = Outcome(e.file, "in-place" if here else "deleted", "" if here else "deleted files cannot be restored")
        elif here and there:  # an interrupted cross-device move: the source is whole, drop the copy
            if file_sha256(e.dest) == e.sha256:
                os.unlink(e.dest)
            o = Outcome(e.file, "in-place", "the partial copy at the destination was removed")
        elif here:
            o = Outcome(e.file, "in-place")
        elif not there:
            o = Outcome(e.file, "lost", f"neither {e.file} nor {e.dest} exists")
        elif file_sha256(e.dest) != e.sha256:
            o = Outcome(e.file, "not-restored", f"{e.dest} changed since it was moved (sha256 differs)")
        else:
            move_file(e.dest, e.file)
            os.utime(e.file, ns=(e.mtime_ns, e.mtime_ns))
            o = Outcome(e.file, "restored", e.dest)
        outcomes.append(o)
        if on_outcome:
            on_outcome(o)
    return outcomes
