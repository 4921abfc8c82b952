"""The self-describing ``.npz`` file of a fitted transform: its arrays plus a JSON ``meta`` entry.

The meta says what the file is (``kind``), its format version, the deepfeat version and
when it was made; files are read with ``allow_pickle=False`` and refused when the kind
or a newer format version does not match. Used by fitted PCAs, post-processing chains
and MOP codebooks (:mod:`deepfeat.pooling`).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

import numpy as np

from deepfeat.errors import FormatError, UsageError

PCA_FILE_KIND = "deepfeat.pca"
CHAIN_FILE_KIND = "deepfeat.postchain"
FORMAT_VERSION = 1


def _version() -> str:
    from deepfeat import __version__

    return __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    payload = dict(arrays)
    payload["meta"] = np.array(json.dumps(meta, sort_keys=True))
    tmp = path + ".tmp.npz"
    np.savez(tmp, **payload)
    os.replace(tmp, path)


def _read_npz(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable .npz file ({e})") from None
    if "meta" not in arrays:
        raise FormatError(f"{path}: no 'meta' entry; not a deepfeat {kind} file")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as e:
        raise FormatError(f"{path}: 'meta' is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise FormatError(f"{path}: expected a {kind} file, found kind {found!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {meta.get('format_version')} is newer than this deepfeat understands "
            f"({FORMAT_VERSION}); upgrade deepfeat"
        )
    return arrays, meta
