"""Export of a store's vectors, with ids and paths, to other tools' formats (npz, h5, pkl, csv)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.store.featurestore import FeatureStore

EXPORT_FORMATS = ("npz", "h5", "pkl", "csv")


def export_store(store: FeatureStore, fmt: str, out: str | os.PathLike, feature: str | None = None,
                 post: bool = True) -> Path:
    """Write the store's vectors (post-processed unless *post* is false) with ids and paths.

    * ``npz``: arrays ``features`` (N x D), ``ids``, ``paths``, and ``meta`` (JSON string);
    * ``h5``: datasets ``features``, ``ids``, ``paths``, attribute ``meta``;
    * ``pkl``: the ``{image_path: feature}`` dict of Compute-Features-style scripts
      (deepfeat writes pickles for others; it never loads pickles from users);
    * ``csv``: ``id,path,f0,f1,...``.
    """
    fmt = fmt.lower()
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"export format {fmt!r} unknown; choose {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    if not out.parent.is_dir():  # before reading anything; else the error names a temporary file
        raise UsageError(f"cannot write {out}: the folder {out.parent} does not exist (create it first)")
    if out.is_dir():
        raise UsageError(f"cannot write {out}: it is a folder; give a file name (e.g. {out / 'features.npz'})")
    X = store.vectors(feature, post=post)
    ids = store.ids
    paths = store.paths
    meta = json.dumps({**store.meta, "exported_feature": store.feature_name(feature), "post_applied": post},
                      default=str)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        _write(fmt, tmp, X, ids, paths, meta)
        os.replace(tmp, out)
    except BaseException as e:  # a full disk, a read-only folder: nothing is left behind
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno:  # a write() that failed names no file
            raise OSError(e.errno, e.strerror, str(out)) from e
        raise
    return out


def _write(fmt: str, tmp: Path, X: np.ndarray, ids: np.ndarray, paths: list[str], meta: str) -> None:
    if fmt == "npz":
        with open(tmp, "wb") as f:
            np.savez(f, features=X, ids=ids, paths=np.array(paths, dtype=str), meta=np.array(meta))
    elif fmt == "h5":
        try:
            import h5py
        except ImportError:
            raise UsageError("h5 export needs h5py: pip install 'deepfeat[h5]'") from None
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=X)
            f.create_dataset("ids", data=ids)
            f.create_dataset("paths", data=np.array(paths, dtype=object), dtype=h5py.string_dtype())
            f.attrs["meta"] = meta
    elif fmt == "pkl":
        import pickle

        with open(tmp, "wb") as f:
            pickle.dump({p: X[i].copy() for i, p in enumerate(paths)}, f, protocol=4)
    else:
        import csv

        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "path"] + [f"f{j}" for j in range(X.shape[1])])
            for i in range(len(X)):
                w.writerow([int(ids[i]), paths[i]] + [repr(float(v)) for v in X[i]])
