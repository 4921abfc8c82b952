"""Checksums of a store's files: recorded when they are written, checked cheaply on open, fully on demand.

Every file deepfeat writes into a store gets a record ``{"bytes": size, "sha256": hex}``:

* a shard's feature arrays (``shards/000007.<feature>.npy``): in the metadata of the
  shard's items file (key ``deepfeat.store.checksums``), which is the shard's commit marker,
  so the record is committed atomically with the shard;
* the shard items files, ``items.parquet``, the fitted post-processing (``post.npz``)
  and a pooling codebook (``pooling.npz``): in ``meta.json`` under ``checksums``, at
  the end of each extraction run (consolidation) and whenever deepfeat updates the
  meta after writing one of them;
* a FAISS index (``index/index.faiss``): ``index_bytes`` and ``index_sha256`` in its
  ``index.json``; files beside an index (an on-disk index's ``lists.ivfdata``, DBA vectors) in
  its ``files``;
* a local-feature section's shard files (``local/<name>/000007.npz``, keypoints or regions):
  in ``meta.json`` like the side files, each recorded as soon as it is written
  (:func:`record_file`), checked when the section reads it.

Reading a file compares its size and sampled digest (:func:`quick_problem`: a ``stat`` and
64 KiB read; truncation and a file swapped or edited at the same size are caught, with a message
naming the file); :func:`verify_store` (``deepfeat info
STORE --verify``) hashes everything and checks structure (rows per shard, dims).
Stores written before checksums existed open as before; verify reports their files as
unchecked rather than bad.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: key of the schema metadata of a shard's items parquet that holds its arrays' records
SHARD_KEY = b"deepfeat.checksums"  # a file-format key (the module was deepfeat.checksums): never rename
#: small files beside the shards whose records live in meta.json, refreshed by update_meta
SIDE_FILES = ("post.npz", "pooling.npz", "removed.parquet")  # removed.parquet: deepfeat.store.tombstones
#: the folder of the local-feature sections (deepfeat.localfeat.cache), whose files are recorded in meta.json
SECTIONS_DIR = "local/"
ALGORITHM = "sha256"
#: meta.json's own record: the sha256 of the rest of the meta (canonical JSON), written with it
META_DIGEST_KEY = "meta_sha256"
#: how many blocks of SAMPLE_BLOCK bytes a sampled digest reads, evenly spaced, first and last included
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK = 4096


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex, "sample": hex}`` of a file (``sample``: :func:`sample_digest`,
    checked on every read; ``sha256``: the whole file, checked by ``deepfeat info --verify``)."""
    with open(path, "rb") as f:
        h = hashlib.file_digest(f, "sha256") if hasattr(hashlib, "file_digest") else _digest_blocks(f)
        size = f.tell()
    return {"bytes": size, "sha256": h.hexdigest(), "sample": sample_digest(path)}


def sample_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's size and of :data:`SAMPLE_BLOCKS` blocks of it, evenly spaced (first and
    last included): a constant cost at any size (64 KiB read), cheap enough for every open.

    It tells apart two files of the same size but different content (a shard or an index copied
    from another store) in practice; a single flipped bit outside the blocks needs the full sha256
    (``deepfeat info --verify``)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        last = max(0, size - SAMPLE_BLOCK)
        starts = sorted({last * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)})
        for start in starts:
            h.update(os.pread(f.fileno(), SAMPLE_BLOCK, start))
    return h.hexdigest()


def meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of a store meta without its own record (canonical JSON: sorted keys, no spaces), as
    written by :func:`json.dumps` with ``default=str`` (what :func:`atomic_write_json` writes)."""
    rest = {k: v for k, v in meta.items() if k != META_DIGEST_KEY}
    canonical = json.loads(json.dumps(rest, default=str))
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def meta_problem(meta: dict[str, Any], path: Path) -> str | None:
    """Why *meta* (read from *path*) is not the meta deepfeat wrote, or None (also None for a meta
    written before deepfeat recorded its digest)."""
    want = meta.get(META_DIGEST_KEY)
    if want is None:
        return None
    got = meta_digest(meta)
    if got != want:
        return (f"{path} was edited after deepfeat wrote it (its content's sha256 is {got[:16]}..., it was written "
                f"as {str(want)[:16]}...): the settings it describes may no longer be the ones the stored vectors "
                "were made with")
    return None


def store_fingerprint(recorded: dict[str, dict[str, Any]]) -> str | None:
    """A fingerprint of a store's content from its recorded checksums (the feature arrays and the
    fitted post-processing: what the vectors are), or None for a store without records. An index
    records it when built; an index whose fingerprint differs was built from other vectors."""
    parts = sorted((rel, rec.get("sha256")) for rel, rec in recorded.items()
                   if rel.endswith(".npy") or rel in SIDE_FILES)
    if not parts:
        return None
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def record_file(store, path: Path) -> dict[str, Any]:
    """Record *path*, a file deepfeat just wrote into *store* (a local-feature section's shard), in
    the store's ``meta.json`` (rewritten); returns the record."""
    files = dict((store.meta.get("checksums") or {}).get("files") or {})
    files[Path(path).relative_to(store.path).as_posix()] = record = file_digest(path)
    store.update_meta(checksums={"algorithm": ALGORITHM, "files": files})
    return record


def _digest_blocks(f):  # Python < 3.11
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h


def size_problem(path: Path, record: dict[str, Any] | None) -> str | None:
    """Why *path* cannot be the file of *record*, judged by its size alone (None: it can)."""
    if record is None:
        return None
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing (it was written with {record['bytes']} bytes)"
    if size != record["bytes"]:
        return f"{path} has {size} bytes but was written with {record['bytes']}: truncated or edited"
    return None


def quick_problem(path: Path, record: dict[str, Any] | None) -> str | None:
    """Why *path* cannot be the file of *record*, judged by its size and its sampled digest (a
    ``stat`` and 64 KiB read; records written before sampled digests are judged by size alone)."""
    msg = size_problem(path, record)
    if msg or record is None or not record.get("sample"):
        return msg
    if sample_digest(path) != record["sample"]:
        return (f"{path} has the size it was written with but other content (a file of the same size from "
                "elsewhere, or edited)")
    return None


def content_problem(path: Path, record: dict[str, Any]) -> str | None:
    """Why *path* is not the file of *record* (size, then sha256), or None."""
    msg = size_problem(path, record)
    if msg:
        return msg
    got = file_digest(path)["sha256"]
    if got != record["sha256"]:
        return f"{path} was edited: its sha256 is {got[:16]}..., it was written as {record['sha256'][:16]}..."
    return None


def shard_records(items_file: Path) -> dict[str, dict[str, Any]] | None:
    """The array records of a committed shard (from its items file's footer), or None if it has none."""
    import pyarrow.parquet as pq

    md = pq.read_schema(items_file).metadata or {}
    raw = md.get(SHARD_KEY)
    return json.loads(raw) if raw else None


# ---------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------

@dataclass
class Check:
    file: str  # relative to the store
    status: str  # ok | bad | unchecked
    detail: str = ""


@dataclass
class VerifyReport:
    store: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.status == "bad" for c in self.checks)

    def add(self, file: str, status: str, detail: str = "") -> None:
        self.checks.append(Check(file, status, detail))

    def counts(self) -> dict[str, int]:
        out = {"ok": 0, "bad": 0, "unchecked": 0}
        for c in self.checks:
            out[c.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "ok": self.ok, "counts": self.counts(),
                "checks": [c.__dict__ for c in self.checks]}


def _check_record(report: VerifyReport, root: Path, rel: str, record: dict[str, Any] | None,
                  missing_ok: bool = False) -> bool:
    path = root / rel
    if record is None:
        if path.is_file():
            report.add(rel, "unchecked", "no checksum recorded (written before deepfeat recorded checksums)")
        elif not missing_ok:
            report.add(rel, "bad", f"{path} is missing")
        return path.is_file()
    msg = content_problem(path, record)
    report.add(rel, "bad" if msg else "ok", msg or f"{record['bytes']} bytes, sha256 {record['sha256'][:12]}")
    return msg is None


def verify_store(store) -> VerifyReport:
    """Hash and check every file of *store* (a :class:`~deepfeat.store.FeatureStore`)."""
    import numpy as np
    import pyarrow.parquet as pq

    from deepfeat.store.items import feature_file_key

    root = store.path
    report = VerifyReport(str(root))
    _verify_meta(report, store)
    recorded = dict((store.meta.get("checksums") or {}).get("files") or {})
    features = store.feature_names
    dims = {name: int(store.meta["features"][name]["dim"]) for name in features}
    total_ok = 0
    committed = store.committed_shards()
    for rel in sorted(recorded):
        if rel.startswith("shards/") and rel.endswith(".items.parquet") and not (root / rel).is_file():
            shard = int(Path(rel).name.split(".")[0])
            report.add(rel, "bad", f"{root / rel} is missing: the commit marker of shard {shard} (its items and "
                                   f"arrays are left out of every search); `deepfeat extract --resume -o {root}` "
                                   "extracts the shard again")
    for shard in committed:
        items_rel = f"shards/{shard:06d}.items.parquet"
        _check_record(report, root, items_rel, recorded.get(items_rel))
        try:
            table = pq.ParquetFile(root / items_rel).read(columns=["status"])  # (read_table imports datasets)
            own = shard_records(root / items_rel) or {}
        except Exception as e:  # noqa: BLE001 -- a damaged parquet fails in many ways
            report.add(items_rel, "bad", f"unreadable items table: {type(e).__name__}: {e}")
            continue
        n_ok = sum(1 for s in table.column("status").to_pylist() if s == "ok")
        total_ok += n_ok
        for name in features:
            rel = f"shards/{shard:06d}.{feature_file_key(name)}.npy"
            record = own.get(Path(rel).name) or recorded.get(rel)
            if not _check_record(report, root, rel, record):
                continue
            try:
                arr = np.load(root / rel, mmap_mode="r", allow_pickle=False)
            except Exception as e:  # noqa: BLE001
                report.add(rel, "bad", f"not a readable .npy: {type(e).__name__}: {e}")
                continue
            if arr.ndim != 2 or arr.shape != (n_ok, dims[name]):
                report.add(rel, "bad", f"shape {arr.shape}, but the shard has {n_ok} ok items of {dims[name]} dims")
    items_rel = "items.parquet"
    if (root / items_rel).is_file() or recorded.get(items_rel):
        if _check_record(report, root, items_rel, recorded.get(items_rel)):
            try:
                n = pq.read_metadata(root / items_rel).num_rows
            except Exception as e:  # noqa: BLE001
                report.add(items_rel, "bad", f"unreadable: {type(e).__name__}: {e}")
            else:
                _verify_consolidated(report, root, n, committed)
    for rel in (*SIDE_FILES, "plan.parquet"):
        pending = store.meta.get("removed_pending") if rel == "removed.parquet" else None
        if pending and (root / rel).is_file() and quick_problem(root / rel, pending) is None:
            _check_record(report, root, rel, pending)  # written by a removal stopped before it recorded it
        else:
            _check_record(report, root, rel, recorded.get(rel), missing_ok=True)
    _verify_sections(report, store, recorded)
    for index_meta in sorted(root.glob("index/*.json")):
        _verify_index(report, root, index_meta)
    return report


def _verify_sections(report: VerifyReport, store, recorded: dict[str, dict[str, Any]]) -> None:
    """The local-feature sections' files: each recorded one hashed (a missing one is bad: its section
    refuses to read it), a file there without a record (a section written before records) unchecked."""
    root = store.path
    on_disk = {p.relative_to(root).as_posix() for p in (root / SECTIONS_DIR).glob("*/*.npz")}
    for rel in sorted(on_disk | {r for r in recorded if r.startswith(SECTIONS_DIR)}):
        before = len(report.checks)
        if _check_record(report, root, rel, recorded.get(rel)):  # ok, or unchecked (no record)
            continue
        name = rel.split("/")[1]
        spec = ((store.meta.get("local_features") or {}).get(name) or {}).get("spec", name)
        check = report.checks[before]
        check.detail += (f"; `deepfeat local-features {root} --name {name} --extractor {spec}` computes it again")


def _verify_meta(report: VerifyReport, store) -> None:
    """meta.json against its own record (the store was opened without that check, to report it here)."""
    path = store.path / "meta.json"
    if store.meta.get(META_DIGEST_KEY) is None:
        report.add("meta.json", "unchecked", "no checksum recorded (written before deepfeat recorded checksums)")
        return
    problem = meta_problem(store.meta, path)
    report.add("meta.json", "bad" if problem else "ok", problem or f"sha256 {store.meta[META_DIGEST_KEY][:12]}")


def _verify_consolidated(report: VerifyReport, root: Path, n: int, committed: list[int]) -> None:
    """items.parquet (n rows) against the committed shards' own items files."""
    import pyarrow.parquet as pq

    n_shards = 0
    for s in committed:
        try:
            n_shards += pq.read_metadata(root / f"shards/{s:06d}.items.parquet").num_rows
        except Exception:  # noqa: BLE001 -- a damaged marker, reported bad above
            return
    if n == n_shards:
        return
    covered = set(pq.ParquetFile(root / "items.parquet").read(columns=["shard"]).column("shard").to_pylist())
    lost = sorted(covered - set(committed))
    if lost:
        report.add("items.parquet", "bad", f"lists shard(s) {lost}, whose commit marker is missing: every command "
                                           "refuses the store until `deepfeat extract --resume` extracts them again")
    else:
        report.add("items.parquet", "unchecked", f"{n} items, the shards hold {n_shards}: shards were committed "
                                                 "after it was written (the store reads the shards' own items "
                                                 "instead; the next run rewrites it)")


def _verify_index(report: VerifyReport, root: Path, meta_path: Path) -> None:
    rel_meta = str(meta_path.relative_to(root))
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        report.add(rel_meta, "bad", f"unreadable index meta: {e}")
        return
    if not isinstance(meta, dict) or "index_file" not in meta:
        return  # not an index meta (another artefact's JSON)
    if meta.get(META_DIGEST_KEY) is not None:
        edited = meta_digest(meta) != meta[META_DIGEST_KEY]
        report.add(rel_meta, "bad" if edited else "ok", f"{meta_path} was edited after deepfeat wrote it; rebuild "
                   "the index (`deepfeat index`)" if edited else f"sha256 {meta[META_DIGEST_KEY][:12]}")
    rel = str((meta_path.parent / meta["index_file"]).relative_to(root))
    record = None
    if "index_bytes" in meta:
        record = {"bytes": meta["index_bytes"], "sha256": meta.get("index_sha256")}
    if record is not None and record["sha256"] is None:
        msg = size_problem(root / rel, record)
        report.add(rel, "bad" if msg else "unchecked",
                   msg or "size checked; no sha256 recorded (index saved before deepfeat recorded checksums)")
        return
    _check_record(report, root, rel, record)
    for extra, rec in (meta.get("files") or {}).items():  # arrays saved beside an index (e.g. DBA vectors)
        _check_record(report, root, str((meta_path.parent / extra).relative_to(root)), rec)


__all__ = ["ALGORITHM", "META_DIGEST_KEY", "SECTIONS_DIR", "SHARD_KEY", "SIDE_FILES", "Check", "VerifyReport",
           "content_problem", "file_digest", "meta_digest", "meta_problem", "quick_problem", "record_file",
           "sample_digest", "shard_records", "size_problem", "store_fingerprint", "verify_store"]
