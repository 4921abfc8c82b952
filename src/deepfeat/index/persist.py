"""Persistence of an index: ``index.faiss`` (FAISS's own format) beside ``index.json`` (its meta).

The meta describes the index (kind, metric, d, parameters, how it was built, the store
meta it was built from) and records the index file's size and sha256; :func:`read_index`
refuses a pair that disagrees, :func:`write_index` writes both through temporary names.
:meth:`Index.load <deepfeat.index.Index.load>` and :meth:`Index.save <deepfeat.index.Index.save>`
are these two functions.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from deepfeat import __version__
from deepfeat.errors import StoreError, UsageError
from deepfeat.index.checks import _faiss
from deepfeat.index.kinds import INDEX_KINDS
from deepfeat.store.checksums import META_DIGEST_KEY, file_digest, meta_digest, quick_problem, sample_digest

META_FORMAT = "deepfeat-index"
META_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "index.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise UsageError(f"{what} must be JSON-serialisable: {e}") from None


def _artefact_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(index file, meta file) for a directory, a ``.faiss`` path or a ``.json`` path."""
    p = Path(path)
    if p.suffix == ".faiss":
        return p, p.with_suffix(".json")
    if p.suffix == ".json":
        return p.with_suffix(".faiss"), p
    return p / INDEX_FILE, p / META_FILE


def read_index(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """The FAISS index and meta saved at *path* (a directory, or its ``.faiss`` / ``.json`` file).

    Raises :class:`StoreError` if a file is missing, unreadable, or the two disagree.
    """
    faiss = _faiss()
    index_path, meta_path = _artefact_paths(path)
    if not meta_path.is_file():
        raise StoreError(f"no index meta at {meta_path}: save an index there with Index.save (or deepfeat index)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError(f"unreadable index meta {meta_path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise StoreError(f"{meta_path} is not a deepfeat index meta (format != {META_FORMAT!r})")
    if meta.get(META_DIGEST_KEY) and meta_digest(meta) != meta[META_DIGEST_KEY]:
        raise StoreError(f"{meta_path} was edited after deepfeat wrote it (its recorded sha256 no longer matches); "
                         "rebuild the index (`deepfeat index STORE`)")
    if not isinstance(meta.get("format_version", 0), int) or int(meta.get("format_version", 0)) > META_VERSION:
        raise StoreError(
            f"{meta_path} has index format version {meta['format_version']}; this deepfeat "
            f"({__version__}) reads up to {META_VERSION}: upgrade deepfeat"
        )
    name = meta.get("index_file", index_path.name)
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise StoreError(f"{meta_path}: index_file must be the name of a file beside it, not {name!r}; "
                         "rebuild the index (`deepfeat index STORE`)")
    index_path = meta_path.with_name(name)
    if not index_path.is_file():
        raise StoreError(f"index file {index_path} is missing (its meta {meta_path} exists)")
    size = index_path.stat().st_size
    if "index_bytes" in meta and size != meta["index_bytes"]:
        raise StoreError(
            f"{index_path} has {size} bytes but its meta says {meta['index_bytes']}: truncated or replaced; rebuild "
            "the index (`deepfeat index STORE`)"
        )
    if meta.get("index_sample") and sample_digest(index_path) != meta["index_sample"]:
        raise StoreError(
            f"{index_path} is not the index its meta {meta_path} was written with (same size, other content: "
            "copied from elsewhere, or edited); rebuild the index (`deepfeat index STORE`)"
        )
    _check_beside(meta, meta_path)
    try:
        # an on-disk IVF index (deepfeat.index.ondisk) opens its lists file beside it, wherever the folder moved
        # (mapped read-only where the folder cannot be written: FAISS maps the lists "r+" otherwise)
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | (0 if os.access(index_path.parent, os.W_OK) else faiss.IO_FLAG_READ_ONLY)
        index = faiss.read_index(str(index_path), flags)
    except RuntimeError as e:
        raise StoreError(f"cannot read FAISS index {index_path}: {str(e).strip().splitlines()[-1]}") from None
    metric = "ip" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2"
    found = {"d": int(index.d), "ntotal": int(index.ntotal), "metric": metric}
    wrong = {k: (meta.get(k), v) for k, v in found.items() if meta.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: meta {a!r}, index {b!r}" for k, (a, b) in wrong.items())
        raise StoreError(f"{index_path} does not match its meta {meta_path} ({detail}); rebuild the index")
    if meta.get("kind") not in INDEX_KINDS or meta.get("kind") == "auto":
        raise StoreError(f"{meta_path}: unknown index kind {meta.get('kind')!r}")
    return index, meta


def _check_beside(meta: dict[str, Any], meta_path: Path) -> None:
    """The files recorded beside an index (``files``: an on-disk index's lists, DBA vectors), each by its
    size and sampled digest (:func:`~deepfeat.store.checksums.quick_problem`)."""
    files = meta.get("files") or {}
    if not isinstance(files, dict):
        raise StoreError(f"{meta_path}: 'files' must be an object; rebuild the index (`deepfeat index STORE`)")
    for name, record in files.items():
        plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        if not plain or not isinstance(record, dict):
            raise StoreError(f"{meta_path}: a file beside the index must be a plain name with its record, not "
                             f"{name!r}; rebuild the index (`deepfeat index STORE`)")
        problem = quick_problem(meta_path.with_name(name), record)
        if problem:
            raise StoreError(f"{problem}; rebuild the index (`deepfeat index STORE`)")


def write_faiss(faiss_index: Any, path: str | os.PathLike[str]) -> None:
    """``faiss.write_index`` to *path* through a temporary name (straight to disk: no in-memory copy of
    a large index). A folder that cannot be written (read-only, not ours) is the system's OSError
    naming the file, before FAISS starts; a write that fails (a full disk) is a StoreError naming the
    file and the system's reason, instead of FAISS's internal message; the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        open(tmp, "wb").close()
        _faiss().write_index(faiss_index, str(tmp))
        os.replace(tmp, path)
    except RuntimeError as e:
        _discard(tmp)
        raise StoreError(f"cannot write {path}: {faiss_io_reason(e)}") from None
    except OSError as e:
        _discard(tmp)
        raise OSError(e.errno, e.strerror, str(path)) from e
    except BaseException:
        _discard(tmp)
        raise


def _discard(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # a read-only folder
        pass


def faiss_io_reason(e: Exception) -> str:
    """The system's reason inside a FAISS I/O error (``... write error ...: 0 != 4 (No space left on
    device)`` -> ``No space left on device``), else its last line."""
    import re

    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    m = re.search(r"\(([^()]+)\)\s*$", text)
    return m.group(1) if m else text


def write_index(faiss_index: Any, meta: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write *faiss_index* and *meta* (updated in place with the index file's name, size, sha256
    and the time) as the pair named by *path*; returns the meta file's path."""
    from deepfeat.store import atomic_write_bytes

    index_path, meta_path = _artefact_paths(path)
    index_path.parent.mkdir(parents=True, exist_ok=True)
    write_faiss(faiss_index, index_path)
    meta["index_file"] = index_path.name
    digest = file_digest(index_path)  # checked by `deepfeat info --verify` (deepfeat.store.checksums)
    meta["index_bytes"] = digest["bytes"]
    meta["index_sha256"] = digest["sha256"]
    meta["index_sample"] = sample_digest(index_path)  # checked on every load (a 64 KiB read)
    meta["saved_at"] = _now()
    meta[META_DIGEST_KEY] = meta_digest(meta)  # the meta's own record, checked on every load
    text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(meta_path, text.encode("utf-8"))
    return meta_path
