"""A store's saved index kept up to date when the store changes (items removed, shards appended,
a compaction that moved rows), in place where the index kind allows, rebuilt otherwise.

The index's labels are the store's feature rows. ``index/rows.npy`` (written with the index)
holds the item id of each label, so :func:`refresh_index` knows which rows left, which moved
and which are new:

* flat (``IDMap,Flat``), ivf, ivfpq, in memory or with on-disk lists (:mod:`deepfeat.index.ondisk`):
  the new rows are added (FAISS ``add_with_ids``, under labels that cannot clash), the removed
  ones deleted (``remove_ids``), then every entry relabelled to its row now (the ``id_map``, or
  each inverted list's ids through ``update_entries``). Trained quantizers are kept. An index
  saved without ``rows.npy`` (before deepfeat saved it) is rebuilt once, then kept in place. An on-disk
  index gets a new lists file, merged from the old one and the new rows
  (``merge_from_multiple``), then edited; the old file is only read.
* hnsw (a graph FAISS cannot delete from), an index with DBA-augmented vectors, or one whose
  store changed in another way (model, post-processing): rebuilt with the same kind and
  parameters, saying so.

The updated index is written to ``STORE/index.new/`` and swapped in with two renames; a crash
leaves the old index (stale: searches are exact until the next refresh), or none with a complete
``index.new`` (renamed into place by the next refresh, searches exact meanwhile). Derived files
in ``index/`` (saved DBA vectors) are not carried over: they are recomputed when next used.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.index.checks import _faiss
from deepfeat.store import FeatureStore, atomic_save_npy
from deepfeat.store.checksums import file_digest
from deepfeat.store.removal import vectors_fingerprint

log = logging.getLogger(__name__)

INDEX_DIR = "index"
ROWS_FILE = "rows.npy"
#: labels of rows being added, until every entry is relabelled (above any row number)
_TEMP = 1 << 50


def index_source_meta(store: FeatureStore, feature: str) -> dict[str, Any]:
    """What an index must agree on with its store to be usable."""
    return {
        "store_created": store.meta.get("created"),
        "model": store.meta["model"].get("spec"),
        "weights_sha256": store.meta["model"].get("weights_sha256"),
        "feature": feature,
        "pooling": store.meta.get("pooling"),
        "post": store.meta.get("post"),
        "post_fitted_rows": store.meta.get("post_fitted_rows"),
        "rows": len(store),
        # what the vectors are, in their order: an index built from other vectors (another store's,
        # or before a removal, an append or a compaction) has another one
        "store_fingerprint": vectors_fingerprint(store),
    }


def save_rows(folder: Path, ids: np.ndarray, meta: dict[str, Any]) -> None:
    """``rows.npy`` (the item id of each label) beside an index, recorded in its meta's ``files``."""
    atomic_save_npy(folder / ROWS_FILE, np.asarray(ids, np.int64))
    meta.setdefault("files", {})[ROWS_FILE] = file_digest(folder / ROWS_FILE)


def label_ids(folder: Path, meta: dict[str, Any]) -> np.ndarray | None:
    """The item id of each label of the index in *folder* (meta *meta*): its ``rows.npy`` when the
    meta records it; None for an index saved without it (rebuilt rather than guessed)."""
    from deepfeat.store.checksums import quick_problem

    f = folder / ROWS_FILE
    record = (meta.get("files") or {}).get(ROWS_FILE)
    if record is None or not f.is_file() or quick_problem(f, record) is not None:
        return None
    ids = np.load(f, allow_pickle=False)
    return ids if len(ids) == int(meta["ntotal"]) else None


def refresh_index(store: FeatureStore, threads: int | None = None) -> str:
    """Bring the index saved in *store* up to date with it (module docstring); a one-line account."""
    from deepfeat.index.faiss_index import Index
    from deepfeat.index.ondisk import is_ondisk, open_ondisk

    folder = store.path / INDEX_DIR
    _recover(store.path)
    if not (folder / "index.json").is_file():
        return "no saved index"
    ondisk = is_ondisk(folder)
    index = open_ondisk(folder, threads=threads) if ondisk else Index.load(folder, threads=threads)
    have = index.meta.get("source_meta") or {}
    feature = store.feature_name(have.get("feature"))
    want = index_source_meta(store, feature)
    if all(have.get(k) == v for k, v in want.items()):
        return f"{index.kind} index up to date ({index.ntotal} rows)"
    if not len(store):
        shutil.rmtree(folder)
        return f"{index.kind} index deleted: the store has no rows left"
    other = [k for k in want if k not in ("rows", "store_fingerprint") and have.get(k) != want[k]]
    old = label_ids(folder, index.meta)
    new = np.asarray(store.ids, np.int64)
    why = (f"{', '.join(other)} changed" if other else "it was saved without its rows file" if old is None
           else "HNSW cannot delete entries" if index.kind == "hnsw"
           else "it holds DBA-augmented vectors" if index.meta.get("augmentation") else None)
    tmp = store.path / f"{INDEX_DIR}.new"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if why:
        _rebuild(store, index, feature, want, tmp, ondisk, threads)
        _swap(store.path, tmp)
        return f"{index.kind} index rebuilt over {len(new)} rows ({why})"
    gone, added = _update(store, index, feature, old, new, tmp, ondisk)
    meta = index.meta
    meta.update(ntotal=int(index.faiss_index.ntotal), next_id=len(new), source_meta=want, updated_at=_now())
    if ondisk and isinstance(meta.get("storage"), dict):
        meta["storage"]["lists_bytes"] = os.path.getsize(tmp / "lists.ivfdata")
    for key in ("files", "index_bytes", "index_sha256", "index_sample"):
        meta.pop(key, None)
    save_rows(tmp, new, meta)
    if ondisk:  # the edited lists, recorded like a build's (checked on load, by `info --verify`)
        meta["files"]["lists.ivfdata"] = file_digest(tmp / "lists.ivfdata")
    from deepfeat.index.persist import write_index

    write_index(index.faiss_index, meta, tmp)
    _swap(store.path, tmp)
    where = "on-disk " if ondisk else ""
    return f"{where}{index.kind} index updated in place: {gone} removed, {added} added, {len(new)} rows"


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _rows_vectors(store: FeatureStore, feature: str, rows: np.ndarray) -> np.ndarray:
    """Post-processed vectors of feature rows *rows* (sorted), one shard in memory at a time."""
    parts, start = [], 0
    for _, arr in store.features(feature):
        sel = rows[(rows >= start) & (rows < start + len(arr))] - start
        if len(sel):
            parts.append(np.asarray(arr[sel], np.float32))
        start += len(arr)
    x = np.concatenate(parts) if parts else np.zeros((0, store.meta["features"][feature]["dim"]), np.float32)
    return np.ascontiguousarray(store.post.apply(x), np.float32)


def _update(store: FeatureStore, index, feature: str, old: np.ndarray, new: np.ndarray, tmp: Path,
            ondisk: bool) -> tuple[int, int]:
    """Add, remove, relabel (module docstring); the index edited is *index* (in memory) or a new
    lists file in *tmp* (on disk). Returns (entries removed, rows added)."""
    faiss = _faiss()
    row_of = {int(i): r for r, i in enumerate(new.tolist())}
    relabel = np.array([row_of.get(int(i), -1) for i in old.tolist()], np.int64)
    gone_labels = np.nonzero(relabel < 0)[0].astype(np.int64)
    add_rows = np.nonzero(~np.isin(new, old))[0].astype(np.int64)
    xb = _rows_vectors(store, feature, add_rows)
    fidx = index.faiss_index
    if ondisk:
        fidx = _merged_ondisk(tmp, fidx, xb, add_rows + _TEMP)
    elif len(add_rows):
        fidx.add_with_ids(xb, add_rows + _TEMP)
    if len(gone_labels):
        fidx.remove_ids(faiss.IDSelectorBatch(gone_labels))
    _relabel(fidx, index.kind, relabel)
    index._index = fidx
    return len(gone_labels), len(add_rows)


def _map(labels: np.ndarray, relabel: np.ndarray) -> np.ndarray:
    temp = labels >= _TEMP
    out = np.empty_like(labels)
    out[temp] = labels[temp] - _TEMP
    out[~temp] = relabel[labels[~temp]]
    return out


def _relabel(fidx, kind: str, relabel: np.ndarray) -> None:
    faiss = _faiss()
    if kind == "flat":
        ids = faiss.vector_to_array(fidx.id_map).astype(np.int64)
        faiss.copy_array_to_vector(_map(ids, relabel), fidx.id_map)
        return
    invlists = faiss.extract_index_ivf(fidx).invlists
    for lst in range(invlists.nlist):
        n = invlists.list_size(lst)
        if not n:
            continue
        ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n).copy()
        codes = faiss.rev_swig_ptr(invlists.get_codes(lst), n * invlists.code_size).copy()
        new_ids = np.ascontiguousarray(_map(ids, relabel))
        invlists.update_entries(lst, 0, n, faiss.swig_ptr(new_ids), faiss.swig_ptr(codes))


def _merged_ondisk(tmp: Path, old_index, xb: np.ndarray, labels: np.ndarray):
    """A copy of the on-disk index *old_index* whose lists (a new file in *tmp*) hold its entries
    and the rows *xb* under *labels*; the old lists file is only read."""
    from deepfeat.index.ondisk import LISTS_FILE

    faiss = _faiss()
    src = faiss.extract_index_ivf(old_index)
    empty_path = str(tmp / ".empty.faiss")
    faiss.write_index(old_index, empty_path)  # quantizer + table (lists read from the old file by its name)
    merged = faiss.read_index(empty_path, faiss.IO_FLAG_SKIP_IVF_DATA)
    extra = faiss.read_index(empty_path, faiss.IO_FLAG_SKIP_IVF_DATA)
    os.remove(empty_path)
    for idx in (merged, extra):
        ivf = faiss.extract_index_ivf(idx)
        fresh = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(fresh, True)
        fresh.this.disown()  # owned by the index now
        idx.ntotal = ivf.ntotal = 0
    if len(xb):
        extra.add_with_ids(xb, labels)
    lists = faiss.OnDiskInvertedLists(src.nlist, src.code_size, str(tmp / LISTS_FILE))
    parts = faiss.InvertedListsPtrVector()
    for inv in (src.invlists, faiss.extract_index_ivf(extra).invlists):
        parts.push_back(inv)
    ntotal = lists.merge_from_multiple(parts.data(), parts.size(), False)
    ivf = faiss.extract_index_ivf(merged)
    merged.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    return merged


def _rebuild(store: FeatureStore, index, feature: str, want: dict[str, Any], tmp: Path, ondisk: bool,
             threads: int | None) -> None:
    """The same kind and parameters over the store's rows now, written into *tmp*."""
    from deepfeat.index.faiss_index import Index

    params = dict(index.params)
    if "train_size" in params:
        params["train_size"] = min(int(params["train_size"]), len(store))
    if ondisk:
        from deepfeat.index.ondisk import StoreSource, build_ondisk

        built = build_ondisk(StoreSource(store.path, feature), tmp, kind=index.kind, metric=index.metric,
                             seed=index.meta.get("seed", 0), source_meta=want, **params)
    else:
        built = Index.build(store.vectors(feature), kind=index.kind, metric=index.metric, threads=threads,
                            seed=index.meta.get("seed", 0), source_meta=want, **params)
    meta = built._meta
    save_rows(tmp, np.asarray(store.ids, np.int64), meta)
    built.save(tmp)


def _recover(root: Path) -> None:
    """Finish or undo a swap a crash interrupted (module docstring)."""
    live, new, old = root / INDEX_DIR, root / f"{INDEX_DIR}.new", root / f"{INDEX_DIR}.old"
    if not live.exists() and (new / "index.json").is_file():
        os.replace(new, live)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _swap(root: Path, tmp: Path) -> None:
    live, old = root / INDEX_DIR, root / f"{INDEX_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if live.exists():
        os.replace(live, old)
    os.replace(tmp, live)
    shutil.rmtree(old, ignore_errors=True)
