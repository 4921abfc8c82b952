"""A feature store as a search engine: queries embedded exactly as the store was made.

:class:`SearchEngine` opens a store, its FAISS index (``STORE/index/``, built by
``deepfeat index``; exact search when there is none), and, only when an image query
arrives, the model and descriptor network described by the store's own ``meta.json``:
same model and weights, layer(s), pooling (and MOP codebook), scales, size policy and
post-processing. Queries can be image files (optionally a region ``x1,y1,x2,y2`` cut
out first, as the Oxford protocol requires), rows/ids/paths already in the store, or
vectors. Results carry the store's ids and paths.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from ..errors import DeepfeatError, StoreError, UsageError
from ..store import FeatureStore

log = logging.getLogger(__package__)  # "deepfeat.search", as before the package split

INDEX_DIR = "index"


@dataclass
class Hit:
    rank: int
    row: int
    id: int
    path: str
    score: float
    inliers: int | None = None  # spatial verification inliers, for verified hits

    def to_dict(self) -> dict[str, Any]:
        d = {"rank": self.rank, "id": self.id, "path": self.path, "score": round(self.score, 6)}
        if self.inliers is not None:
            d["inliers"] = self.inliers
        return d


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
    }


def build_index(store: FeatureStore, kind: str = "auto", metric: str = "ip", feature: str | None = None,
                threads: int | None = None, **params: Any):
    """Build and save a FAISS index over the store's vectors (ids = feature rows)."""
    from ..index import Index

    feature = store.feature_name(feature)
    xb = store.vectors(feature)
    if len(xb) == 0:
        raise StoreError(f"{store.path} has no features to index")
    index = Index.build(xb, kind=kind, metric=metric, ids=np.arange(len(xb), dtype=np.int64), threads=threads,
                       source_meta=index_source_meta(store, feature), **params)
    index.save(store.path / INDEX_DIR)
    return index


class SearchEngine:
    """Search a feature store (see the module docstring)."""

    def __init__(self, store: str | os.PathLike | FeatureStore, feature: str | None = None, device: str = "cpu",
                 use_index: bool = True, threads: int | None = None):
        self.store = store if isinstance(store, FeatureStore) else FeatureStore(store)
        self.feature = self.store.feature_name(feature)
        self.xb = self.store.vectors(self.feature)
        if len(self.xb) == 0:
            raise StoreError(f"{self.store.path} has no features to search")
        items = self.store.ok_items()
        self.ids = items.column("id").to_numpy()
        self.paths = items.column("path").to_pylist()
        self._path_rows = {p: i for i, p in enumerate(self.paths)}
        self.device = device
        self.threads = threads
        self.index = self._open_index() if use_index else None
        self._fnet = None
        self._model = None
        self._dba_cache: dict[tuple[int, float], tuple[Any, np.ndarray]] = {}
        self._local: dict[str | None, Any] = {}  # local-feature caches and their query extractors
        self._local_x: dict[str | None, Any] = {}
        self._dba_exact: dict[tuple[int, float], np.ndarray] = {}
        self._rerankers: dict[tuple[str, int, float], Any] = {}

    # -- index ----------------------------------------------------------------

    def _open_index(self):
        from ..index import Index

        d = self.store.path / INDEX_DIR
        if not (d / "index.json").is_file():
            return None
        index = Index.load(d, threads=self.threads)
        want = index_source_meta(self.store, self.feature)
        have = index.meta.get("source_meta") or {}
        stale = [k for k in want if have.get(k) != want[k]]
        if stale:
            log.warning("index in %s is stale (%s differ); using exact search. Rebuild with `deepfeat index`.",
                        d, ", ".join(stale))
            return None
        return index

    @property
    def exact_index(self):
        """A flat (exact) index over the vectors, for when no saved index applies."""
        from ..index import Index

        if getattr(self, "_flat", None) is None:
            self._flat = Index.build(self.xb, kind="flat", metric="ip",
                                     ids=np.arange(len(self.xb), dtype=np.int64), threads=self.threads)
        return self._flat

    @property
    def active_index(self):
        return self.index if self.index is not None else self.exact_index

    # -- queries ----------------------------------------------------------------

    @property
    def model(self):
        if self._model is None:
            from ..models import load_model

            spec = self.store.meta["model"]["spec"]
            model = load_model(spec, device=self.device)
            sha = self.store.meta["model"].get("weights_sha256")
            if sha and model.weights_sha256 and sha != model.weights_sha256:
                raise StoreError(f"the weights of {spec} changed since the store was made "
                                 f"(sha256 {model.weights_sha256[:12]} vs {sha[:12]})")
            self._model = model
        return self._model

    @property
    def feature_net(self):
        if self._fnet is None:
            from ..features import FeatureNet
            from ..pooling import get_pooling, load_pooling

            meta = self.store.meta
            codebook = self.store.path / "pooling.npz"
            pooling = load_pooling(codebook) if codebook.is_file() else get_pooling(meta["pooling"])
            self._fnet = FeatureNet(self.model, meta["layers"], pooling, tuple(meta.get("scales", [1.0])),
                                    meta.get("scale_combine", "sum")).eval()
        return self._fnet

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Descriptors (post-processed) of decoded images of the store's size policy."""
        import torch

        out = []
        layer_i = self.store.meta["layers"].index(self.feature)
        for px in pixels:  # one at a time: query images may differ in size
            with torch.inference_mode():
                v = self.feature_net(torch.from_numpy(px)[None].to(self.model.device))[layer_i]
            out.append(v.float().cpu().numpy().reshape(1, -1))
        x = np.concatenate(out).astype(np.float32)
        return np.ascontiguousarray(self.store.post.apply(x), dtype=np.float32)

    def decode(self, image: str | os.PathLike | BinaryIO, bbox: Sequence[float] | None = None) -> np.ndarray:
        from ..images import decode_image
        from ..preprocess import parse_size_policy

        policy = parse_size_policy(self.store.meta.get("size", "model"))
        return decode_image(image, policy, self.model.data_config, crop_box=tuple(bbox) if bbox else None,
                            draft=self.store.meta.get("draft_decode", True)).pixels

    def embed_images(self, images: Sequence[str | os.PathLike | BinaryIO],
                     bboxes: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
        """Descriptors of image files (or file objects), each optionally cropped to a box."""
        bboxes = bboxes or [None] * len(images)
        return self.embed_pixels([self.decode(im, bb) for im, bb in zip(images, bboxes)])

    def row(self, key: str | int) -> int:
        """Feature row of a store id (int or digits) or a stored path."""
        if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit()):
            hit = np.nonzero(self.ids == int(key))[0]
            if not len(hit):
                raise UsageError(f"id {key} is not in the store (or failed to extract)")
            return int(hit[0])
        for cand in (key, os.path.normpath(key)):
            if cand in self._path_rows:
                return self._path_rows[cand]
        raise UsageError(f"{key!r} is not a path or id in the store")

    def resolve_queries(self, queries: Sequence[str], bbox: Sequence[float] | None = None
                        ) -> tuple[np.ndarray, list[str], list[int | None]]:
        """Turn CLI query strings into vectors: ``.npy`` files, stored paths/ids, or image files.

        Returns (xq, labels, rows) where rows[i] is the store row of a stored query (or None)."""
        vecs, labels, rows = [], [], []
        for q in queries:
            if q.endswith(".npy") and Path(q).is_file():
                v = np.load(q, allow_pickle=False).astype(np.float32)
                v = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v.reshape(1, -1)
                if v.shape[1] != self.xb.shape[1]:
                    raise UsageError(f"{q}: vectors of dim {v.shape[1]}, the store's are {self.xb.shape[1]}")
                vecs.append(v)
                labels.extend([f"{q}[{i}]" for i in range(len(v))])
                rows.extend([None] * len(v))
                continue
            row = None
            if bbox is None:
                try:
                    row = self.row(q)
                except UsageError:
                    row = None
            if row is not None:
                vecs.append(self.xb[row: row + 1])
                labels.append(self.paths[row])
                rows.append(row)
                continue
            if not Path(q).is_file():
                raise UsageError(f"query {q!r} is not an image file, a .npy file, or a path/id in the store")
            vecs.append(self.embed_images([q], [bbox]))
            labels.append(q + (f" [{','.join(str(v) for v in bbox)}]" if bbox else ""))
            rows.append(None)
        return np.ascontiguousarray(np.concatenate(vecs), dtype=np.float32), labels, rows

    # -- search -----------------------------------------------------------------

    def reranker(self, spec: Any, dba: int = 0, alpha: float = 0.0):
        """The :mod:`deepfeat.rerank` re-ranker for *spec*, one per (spec, DBA setting), kept with its
        offline part (diffusion's k-NN graph) so that it is built once per engine."""
        from ..rerank import get_reranker

        r = get_reranker(spec)
        key = (r.spec, int(dba), float(alpha) if dba else 0.0)
        return self._rerankers.setdefault(key, r)

    def rerank_stats(self) -> list[dict[str, Any]]:
        """Cost of each re-ranker used so far: offline seconds (graph build), ms per query."""
        return [r.stats for r in self._rerankers.values()]

    def search(self, xq: np.ndarray, k: int = 10, qe: int = 0, alpha: float = 0.0, dba: int = 0,
               exclude_rows: Sequence[int | None] | None = None, rerank: str | None = None) -> list[list[Hit]]:
        """Top-*k* hits per query, with optional alpha-QE and DBA (see :mod:`deepfeat.index`), then an
        optional re-ranking of the shortlist (``rerank="diffusion"``, ``"kreciprocal:k1=20"``...,
        :mod:`deepfeat.rerank`); re-ranked hits carry the re-ranker's score.

        *exclude_rows* drops a query's own row from its results (searching by a stored image)."""
        from ..index import alpha_query_expansion

        if k < 1:
            raise UsageError(f"--top must be at least 1, not {k}")
        rr = self.reranker(rerank, dba, alpha) if rerank else None
        index, xb = self.active_index, self.xb
        if dba:
            index, xb = self.dba(dba, alpha)
        extra = 1 if exclude_rows is not None and any(r is not None for r in exclude_rows) else 0
        kk = min(len(xb), k + extra)
        if qe:
            _, I0 = index.search(xq, min(len(xb), qe + extra))
            if extra:
                I0 = _drop_rows(I0, exclude_rows, qe)
            xq = alpha_query_expansion(xq, xb, I0, None, qe, alpha)
        if rr is not None:
            _, I = index.search(xq, min(len(xb), max(kk, rr.shortlist(len(xb)))))
            # a stored query is its own database row only while neither QE nor DBA changed it
            rows = exclude_rows if not (qe or dba) else None
            I, D = rr.rerank(xq, xb, I, rows, index=index)
        else:
            D, I = index.search(xq, kk)
        out = []
        for qi in range(len(xq)):
            hits = []
            skip = exclude_rows[qi] if exclude_rows is not None else None
            for d, i in zip(D[qi], I[qi]):
                if i < 0 or (skip is not None and i == skip):
                    continue
                hits.append(Hit(len(hits) + 1, int(i), int(self.ids[i]), self.paths[i], float(d)))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def rank_all(self, xq: np.ndarray, qe: int = 0, alpha: float = 0.0, dba: int = 0, rerank: str | None = None,
                 query_rows: Sequence[int | None] | None = None) -> np.ndarray:
        """Full rankings (Q x N feature rows), exact, for evaluation; *rerank* re-orders each query's
        shortlist (:meth:`search`), the rest keeps the global order. *query_rows*: the store row of
        each query that is a stored item (None for others), which k-reciprocal re-ranking uses."""
        from ..index import database_side_augmentation

        rr = self.reranker(rerank, dba, alpha) if rerank else None
        xb = self.xb
        if dba and self.active_index.kind == "flat":  # the saved DBA vectors are exact: reuse them
            xb = self.dba(dba, alpha)[1]
        elif dba:
            key = (int(dba), float(alpha))
            if key not in self._dba_exact:
                self._dba_exact[key] = database_side_augmentation(xb, dba, alpha, self.exact_index)
            xb = self._dba_exact[key]
        return rank_arrays(xq, xb, qe, alpha, rr, query_rows if not dba else None,
                           index=self.exact_index if not dba else None)

    # -- spatial verification (deepfeat.verify) ---------------------------------

    def local_cache(self, name: str | None = None):
        """The store's cached local features (:class:`deepfeat.local_store.LocalFeatureCache`)."""
        if name not in self._local:
            from ..local_store import LocalFeatureCache

            self._local[name] = LocalFeatureCache(self.store, name)
        return self._local[name]

    def query_local_features(self, image: str | os.PathLike | BinaryIO | None = None, row: int | None = None,
                             bbox: Sequence[float] | None = None, name: str | None = None):
        """Local features of a query: cached for a stored image (*row*), else computed from
        *image* like the cached ones; restricted to *bbox* (original pixels) if given."""
        cache = self.local_cache(name)
        if row is not None:
            return cache[row].within(bbox)
        if image is None:
            raise UsageError("spatial verification needs a query image or a stored query (vectors have no keypoints)")
        if name not in self._local_x:
            from dataclasses import replace

            from ..local_features import LocalExtractor, parse_local_spec

            spec = replace(parse_local_spec(cache.spec), layer=cache.meta.get("layer"))
            self._local_x[name] = LocalExtractor(spec, self.model if spec.extractor == "cnn" else None)
        return self._local_x[name].extract(image).within(bbox)

    def verify(self, hits: list[Hit], query_features, params, name: str | None = None) -> list[Hit]:
        """Re-order *hits* (one query's, best first) by spatial verification of the first
        ``params.top`` (:func:`deepfeat.verify.verify_ranking`); verified hits carry inliers."""
        from dataclasses import replace

        from ..verify import verify_ranking

        cache = self.local_cache(name)
        res = verify_ranking(query_features, [h.row for h in hits], cache.__getitem__, params)
        return [replace(hits[i], rank=k + 1, inliers=res.inliers.get(hits[i].row))
                for k, i in enumerate(res.order)]


    # -- database-side augmentation, saved beside the index ------------------------------

    def _dba_base(self) -> dict[str, Any]:
        """What the DBA neighbours came from: the saved index (kind, build time) or exact search."""
        if self.index is None:
            return {"kind": "flat", "saved": False}
        m = self.index.meta
        return {"kind": m.get("kind"), "params": m.get("params"), "built_at": m.get("built_at"), "saved": True}

    def dba(self, n: int, alpha: float = 0.0) -> tuple[Any, np.ndarray]:
        """(index, vectors) of the database augmented with *n* neighbours (alpha-weighted), computed
        once and saved as ``STORE/index/dba-n<n>-a<alpha>.{faiss,json,npy}``; recomputed (and saved
        again) when the store or its index changed since (the index's ``source_meta`` check, plus the
        index the neighbours came from). A read-only store keeps them in memory only."""
        from ..index import dba_index

        key = (int(n), float(alpha))
        if key in self._dba_cache:
            return self._dba_cache[key]
        stem = self.store.path / INDEX_DIR / f"dba-n{int(n)}-a{float(alpha):g}"
        want = {"source_meta": index_source_meta(self.store, self.feature), "base": self._dba_base(),
                "augmentation": {"method": "dba", "n": int(n), "alpha": float(alpha)}}
        found = self._load_dba(stem, want)
        if found is None:
            found = dba_index(self.active_index, self.xb, n, alpha)
            self._save_dba(stem, found, want)
        self._dba_cache[key] = found
        return found

    def _load_dba(self, stem: Path, want: dict[str, Any]) -> tuple[Any, np.ndarray] | None:
        from ..checksums import size_problem
        from ..index import Index

        meta_path = stem.with_suffix(".json")
        if not meta_path.is_file():
            return None
        try:
            index = Index.load(meta_path, threads=self.threads)
            m = index.meta
            stale = [k for k in ("source_meta", "base") if m.get("dba", {}).get(k) != want[k]]
            stale += ["augmentation"] if m.get("augmentation") != want["augmentation"] else []
            if stale:
                log.info("saved DBA vectors %s are stale (%s changed); recomputing", meta_path, ", ".join(stale))
                return None
            npy = stem.with_suffix(".npy")
            problem = size_problem(npy, (m.get("files") or {}).get(npy.name))
            if problem:
                raise StoreError(problem)
            xb = np.load(npy, mmap_mode="r", allow_pickle=False)
            if xb.shape != self.xb.shape:
                raise StoreError(f"{npy} holds {xb.shape} vectors, the store {self.xb.shape}")
        except (StoreError, ValueError, OSError) as e:
            log.warning("cannot use the saved DBA vectors %s (%s); recomputing", meta_path, e)
            return None
        return index, np.ascontiguousarray(xb, dtype=np.float32)

    def _save_dba(self, stem: Path, found: tuple[Any, np.ndarray], want: dict[str, Any]) -> None:
        from ..checksums import file_digest
        from ..store import atomic_save_npy

        index, xb = found
        try:
            stem.parent.mkdir(exist_ok=True)
            npy = stem.with_suffix(".npy")
            atomic_save_npy(npy, xb)  # the vectors first; the index meta, written last, commits both
            index._meta["dba"] = {"source_meta": want["source_meta"], "base": want["base"]}
            index._meta["files"] = {npy.name: file_digest(npy)}
            index.save(stem.with_suffix(".faiss"))
        except OSError as e:
            log.warning("cannot save the DBA vectors beside the index (%s); keeping them in memory", e)


def rank_arrays(xq: np.ndarray, xb: np.ndarray, qe: int = 0, alpha: float = 0.0, reranker: Any = None,
                query_rows: Sequence[int | None] | None = None, index: Any = None) -> np.ndarray:
    """Exact full rankings (Q x N rows of *xb*, best first) with alpha-QE over *xb* (already
    DBA-augmented if wanted) and then *reranker*'s re-ordering of each shortlist. *query_rows*:
    each query's row in *xb* when it is a stored item (k-reciprocal counts it once); ignored
    after QE or DBA, which change the vectors. :meth:`SearchEngine.rank_all` on arrays."""
    from ..evaluate import rank_by_similarity
    from ..index import alpha_query_expansion

    ranks = rank_by_similarity(xq, xb)
    if qe:
        xq = alpha_query_expansion(xq, xb, ranks[:, :qe], None, qe, alpha)
        ranks = rank_by_similarity(xq, xb)
    if reranker is not None:
        from ..rerank import rerank_ranks

        ranks = rerank_ranks(reranker, xq, xb, ranks, query_rows if not qe else None, index=index)
    return ranks


def _drop_rows(I: np.ndarray, rows: Sequence[int | None], n: int) -> np.ndarray:
    out = np.full((I.shape[0], n), -1, dtype=I.dtype)
    for qi in range(I.shape[0]):
        keep = [i for i in I[qi] if i >= 0 and i != rows[qi]][:n]
        out[qi, : len(keep)] = keep
    return out


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    if not text:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--bbox {text!r}: give x1,y1,x2,y2 in pixels") from None
    if len(vals) != 4 or vals[2] <= vals[0] or vals[3] <= vals[1]:
        raise UsageError(f"--bbox {text!r}: give x1,y1,x2,y2 with x2 > x1 and y2 > y1")
    return vals  # type: ignore[return-value]


__all__ = ["SearchEngine", "Hit", "build_index", "parse_bbox", "rank_arrays", "DeepfeatError"]
