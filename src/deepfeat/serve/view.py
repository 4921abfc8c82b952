"""One opened state of the served store: :class:`StoreView` (its search engine, index and
the lookups a request needs), and :func:`store_signature`, the few ``stat`` calls that tell
whether the store changed on disk since a view was opened.

A request takes one view when it starts and uses it to the end, so a reload
(:mod:`deepfeat.serve.reload`) that swaps in a new view never changes the rows, ids or index
under a request in flight. The model is not part of a view: a new view adopts the loaded
model of the one before (:meth:`~deepfeat.backends.embedder.Embedder.adopt`)."""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import numpy as np

from deepfeat.errors import StoreError
from deepfeat.search import Hit, SearchEngine
from deepfeat.serve.uploads import ApiError

#: what a change of the store touches (:func:`store_signature`): the store folder (every atomic
#: rename into it), the meta, the tombstones, a compaction's journal, the consolidated items,
#: the shards folder (a committed shard) and the saved index (swapped as a folder, or rewritten:
#: ``index.json`` is written last). Of the index folder only its inode counts: the DBA vectors a
#: search saves into it (``index/dba-*``) are no change of the store.
WATCHED = (".", "meta.json", "removed.parquet", "compact.json", "items.parquet", "shards", "index/index.json")
INODE_ONLY = ("index",)


def store_signature(store_dir: str | os.PathLike) -> tuple:
    """``(inode, size, mtime_ns)`` of each :data:`WATCHED` path of the store, the inode of each
    :data:`INODE_ONLY` one (None where absent): any write deepfeat makes to a store changes it
    (files are replaced by rename: a new inode). A handful of ``stat`` calls, no read."""
    out = []
    for path, inode_only in _watched_paths(os.fspath(store_dir)):
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append(st.st_ino if inode_only else (st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _watched_paths(root: str) -> tuple[tuple[str, bool], ...]:
    """The paths :func:`store_signature` stats, joined once (joining costs more than the stat calls)."""
    return tuple((os.path.join(root, rel), rel in INODE_ONLY) for rel in WATCHED + INODE_ONLY)


class StoreView:
    """The store as one request sees it: the engine (vectors, saved or exact index) and its lookups.

    *generation* counts the views of one server (1 at start-up); *image_root* is the server's
    ``--root`` (None: the folder the extraction ran in, else the current directory)."""

    def __init__(self, store_path: str | os.PathLike, generation: int, image_root: str | None = None,
                 device: str = "cpu", threads: int | None = None):
        self.generation = generation
        self.signature = store_signature(store_path)  # before opening: a change while opening is seen next time
        self.opened = time.time()
        self.engine = SearchEngine(store_path, device=device, threads=threads)
        store = self.engine.store
        self.root = os.path.abspath(image_root or store.meta.get("root") or os.getcwd())
        items = store.ok_items()
        self.widths = items.column("width").to_pylist()
        self.heights = items.column("height").to_pylist()
        self.row_of_id = {int(i): r for r, i in enumerate(self.engine.ids)}
        self.row_of_path = {p: r for r, p in enumerate(self.engine.paths)}
        self.dim = int(self.engine.xb.shape[1])
        self.layer_index = store.meta["layers"].index(self.engine.feature)
        from deepfeat.localfeat.cache import is_regions, local_feature_names, section_meta

        sections = local_feature_names(store)
        regional = [is_regions(section_meta(store, n)) for n in sections]
        self.local_features = [n for n, r in zip(sections, regional) if not r]  # keypoints, for verify
        self.regions = [n for n, r in zip(sections, regional) if r]  # regional descriptors, for regional diffusion

    @property
    def count(self) -> int:
        return len(self.engine.ids)

    def adopt_model(self, before: StoreView) -> None:
        """Use the model and descriptor network *before* loaded (StoreError when this store now
        describes other descriptors than those: another model, layer, pooling or size policy)."""
        if not self.engine.embedder.adopt(before.engine.embedder):
            raise StoreError(f"{self.engine.store.path} now describes other descriptors (model, layer, pooling or "
                             "size policy) than the ones this server loaded; restart the server to serve it")

    def post(self, raw: np.ndarray) -> np.ndarray:
        """Network descriptors (N x D, or one D vector) through this store's post-processing, as its
        vectors were: N x D float32."""
        v = np.asarray(raw, dtype=np.float32)
        v = v.reshape(1, -1) if v.ndim == 1 else v.reshape(len(v), -1)
        return np.ascontiguousarray(self.engine.store.post.apply(v), dtype=np.float32)

    # -- lookups ------------------------------------------------------------------------

    def item_row(self, item_id: int) -> int:
        row = self.row_of_id.get(int(item_id))
        if row is None:
            raise ApiError(404, f"no item with id {item_id} in the store", {"id": item_id})
        return row

    def path_row(self, path: str) -> int:
        for cand in (path, os.path.normpath(path)):
            row = self.row_of_path.get(cand)
            if row is not None:
                return row
        raise ApiError(404, "no item with this path in the store (give a path exactly as stored, or use its id)",
                       {"path": path})

    def file_of(self, row: int) -> str:
        """The file of a stored item: its stored path, relative ones resolved against the image root."""
        p = self.engine.paths[row]
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def item(self, row: int) -> dict[str, Any]:
        i = int(self.engine.ids[row])
        return {"id": i, "path": self.engine.paths[row], "width": self.widths[row], "height": self.heights[row],
                "thumbnail": f"/api/items/{i}/thumbnail", "image": f"/api/items/{i}/image"}

    @staticmethod
    def hit(h: Hit) -> dict[str, Any]:
        d = {"rank": h.rank, "id": h.id, "path": h.path, "score": round(h.score, 6),
             "thumbnail": f"/api/items/{h.id}/thumbnail", "image": f"/api/items/{h.id}/image"}
        if h.inliers is not None:
            d["inliers"] = h.inliers
        return d

    def describe(self) -> dict[str, Any]:
        """For /api/health and /api/info: which view this is, since when, how many items."""
        return {"generation": self.generation, "items": self.count,
                "opened": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.opened))}
