"""The :class:`Index`: a FAISS index whose results are store row ids, with a self-describing meta.

Built from a plan (:func:`~deepfeat.index.plan.plan_index`), trained where the kind
trains, searched, appended to, rebuilt over new vectors (DBA) and checked against the
store it was built from; saved and loaded through :mod:`deepfeat.index.persist`.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat import __version__
from deepfeat.errors import StoreError, UsageError
from deepfeat.index.checks import (
    _check_ids,
    _check_k,
    _check_metric,
    _check_threads,
    _faiss,
    check_vectors,
    omp_threads,
)
from deepfeat.index.kinds import INDEX_KINDS
from deepfeat.index.persist import META_FORMAT, META_VERSION, _jsonable, _now, read_index, write_index
from deepfeat.index.plan import IndexPlan, _positive_int, estimate_memory, plan_index


def _train(faiss: Any, index: Any, xb: np.ndarray, plan: IndexPlan, seed: int) -> int:
    """Seed FAISS's k-means (the IVF quantizer's and, for ivfpq, the PQ's) with *seed* and train
    *index* on ``train_size`` rows of *xb* drawn with *seed*; returns the number of rows used."""
    n = xb.shape[0]
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = int(seed)
    if plan.kind == "ivfpq":
        ivfpq = faiss.downcast_index(index)
        ivfpq.pq.cp.seed = int(seed)
        # index_factory turns on polysemous training (a code permutation for Hamming
        # filtering we never use): it dominates training time, so turn it off
        ivfpq.do_polysemous_training = False
    train_size = plan.params["train_size"]
    rng = np.random.default_rng(seed)
    sample = xb if train_size >= n else xb[np.sort(rng.choice(n, train_size, replace=False))]
    index.train(sample)
    return train_size


class Index:
    """A FAISS index whose results are store row ids, with a self-describing ``meta``.

    Make one with :meth:`build` or :meth:`load`. ``search`` takes N x D float32 queries
    and returns ``(D, I)``: scores (inner products for ``ip``, squared distances for
    ``l2``) and ids, ``-1`` where fewer than k results were found.
    """

    def __init__(self, faiss_index: Any, meta: dict[str, Any], threads: int | None = None) -> None:
        self._index = faiss_index
        self._meta = meta
        self.threads = threads
        self._apply_search_params()

    # -- construction ---------------------------------------------------------------

    @classmethod
    def build(
        cls,
        xb: np.ndarray,
        kind: str = "auto",
        metric: str = "ip",
        ids: Sequence[int] | np.ndarray | None = None,
        seed: int = 0,
        threads: int | None = None,
        source_meta: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Index:
        """Build an index over the rows of *xb* (N x D float32), identified by *ids* (default 0..N-1).

        ``kind`` is a name from :data:`INDEX_KINDS` (``auto`` picks by size); ``params``
        override the kind's defaults (:func:`default_params`). Kinds that train (ivf,
        ivfpq) do so on a sample of ``train_size`` rows drawn with *seed*, which also
        seeds FAISS's k-means. *source_meta* (the feature store's meta) is stored in the
        index meta so that :meth:`verify_source` can later check the index belongs to it.
        """
        faiss = _faiss()
        _check_metric(metric)
        xb = check_vectors(xb, "xb")
        n, d = xb.shape
        ids_arr = np.arange(n, dtype=np.int64) if ids is None else _check_ids(ids, n)
        threads = _check_threads(threads)
        plan = plan_index(n, d, kind, metric, **params)
        source = _jsonable(dict(source_meta or {}), "source_meta")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UsageError(f"seed must be a non-negative integer, not {seed!r}")
        metric_type = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2

        t0 = time.perf_counter()
        with omp_threads(threads):
            index = faiss.index_factory(d, plan.factory, metric_type)
            train_seconds = 0.0
            train_size = 0
            if plan.kind in ("ivf", "ivfpq"):
                train_size = _train(faiss, index, xb, plan, seed)
                train_seconds = time.perf_counter() - t0
            elif plan.kind == "hnsw":
                faiss.downcast_index(index.index).hnsw.efConstruction = plan.params["efConstruction"]
            t1 = time.perf_counter()
            index.add_with_ids(xb, ids_arr)
            add_seconds = time.perf_counter() - t1

        meta: dict[str, Any] = {
            "format": META_FORMAT,
            "format_version": META_VERSION,
            "kind": plan.kind,
            "requested_kind": kind,
            "metric": metric,
            "d": d,
            "ntotal": int(index.ntotal),
            "params": dict(plan.params),
            "factory": plan.factory,
            "seed": int(seed),
            "train_size": train_size,
            "next_id": int(ids_arr.max()) + 1,
            "memory_bytes": plan.memory_bytes,
            "build_seconds": round(time.perf_counter() - t0, 3),
            "train_seconds": round(train_seconds, 3),
            "add_seconds": round(add_seconds, 3),
            "built_at": _now(),
            "deepfeat_version": __version__,
            "faiss_version": faiss.__version__,
            "source_meta": source,
            "augmentation": None,
        }
        return cls(index, meta, threads=threads)

    @classmethod
    def load(cls, path: str | os.PathLike[str], threads: int | None = None) -> Index:
        """Load an index saved by :meth:`save` (a directory, or its ``.faiss`` / ``.json`` file).

        Raises :class:`StoreError` if a file is missing, unreadable, or the two disagree
        (:func:`deepfeat.index.persist.read_index`).
        """
        index, meta = read_index(path)
        return cls(index, meta, threads=_check_threads(threads))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``index.faiss`` and ``index.json`` into directory *path* (created if needed).

        A path ending in ``.faiss`` or ``.json`` names the pair instead (``x.faiss`` + ``x.json``).
        Each file is written to a temporary name and renamed, so a crash never leaves
        a half-written index under the real name. Returns the meta file's path.
        """
        return write_index(self._index, self._meta, path)

    # -- properties -------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the index's self-description (what ``index.json`` holds)."""
        return copy.deepcopy(self._meta)

    @property
    def kind(self) -> str:
        return self._meta["kind"]

    @property
    def metric(self) -> str:
        return self._meta["metric"]

    @property
    def d(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def params(self) -> dict[str, int]:
        return dict(self._meta["params"])

    @property
    def faiss_index(self) -> Any:
        """The underlying FAISS index (for what this class does not wrap)."""
        return self._index

    @property
    def exact(self) -> bool:
        """True when search returns the exact top k: ``flat``, or ``ivf`` with nprobe = nlist."""
        if self.kind == "flat":
            return True
        return self.kind == "ivf" and self.params["nprobe"] >= self.params["nlist"]

    @property
    def threads(self) -> int | None:
        """OpenMP threads FAISS uses for this index's build/search/add (None: FAISS's current setting)."""
        return self._threads

    @threads.setter
    def threads(self, value: int | None) -> None:
        self._threads = _check_threads(value)

    @property
    def nprobe(self) -> int:
        """Inverted lists visited per query (ivf, ivfpq)."""
        self._require_search_param("nprobe")
        return int(self._meta["params"]["nprobe"])

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.set_search_params(nprobe=value)

    @property
    def efSearch(self) -> int:
        """HNSW candidate list size at search time."""
        self._require_search_param("efSearch")
        return int(self._meta["params"]["efSearch"])

    @efSearch.setter
    def efSearch(self, value: int) -> None:
        self.set_search_params(efSearch=value)

    def _require_search_param(self, name: str) -> None:
        spec = INDEX_KINDS[self.kind]
        if name not in spec.search_params:
            valid = ", ".join(spec.search_params) or "none"
            raise UsageError(f"{name} does not apply to a {self.kind!r} index; its search parameters: {valid}")

    def set_search_params(self, **params: int) -> None:
        """Change search-time parameters (``nprobe`` for ivf/ivfpq, ``efSearch`` for hnsw); kept in meta."""
        for name, value in params.items():
            self._require_search_param(name)
            value = _positive_int(name, value)
            if name == "nprobe" and value > self._meta["params"]["nlist"]:
                raise UsageError(f"nprobe ({value}) cannot exceed nlist ({self._meta['params']['nlist']})")
            self._meta["params"][name] = value
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        faiss = _faiss()
        p = self._meta["params"]
        if self.kind in ("ivf", "ivfpq"):
            faiss.extract_index_ivf(self._index).nprobe = int(p["nprobe"])
        elif self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = int(p["efSearch"])

    # -- use ----------------------------------------------------------------------------

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest rows for each query: ``D`` (nq x k float32 scores) and ``I`` (nq x k int64 ids).

        Results are best first; ``I == -1`` (with D = -FLT_MAX for ip, FLT_MAX for l2) pads
        rows that have fewer than k results (k > ntotal, or too few lists probed).
        """
        xq = check_vectors(xq, "xq", self.d)
        k = _check_k(k)
        with omp_threads(self._threads):
            D, I = self._index.search(xq, k)
        return D, I

    def add(self, xb: np.ndarray, ids: Sequence[int] | np.ndarray | None = None) -> None:
        """Append rows (N x D float32) with new *ids* (default: consecutive from the largest id + 1).

        Trained kinds are not retrained: the appended data should come from the same
        distribution. Ids already in the index are refused.
        """
        xb = check_vectors(xb, "xb", self.d)
        n = xb.shape[0]
        start = int(self._meta["next_id"])
        ids_arr = np.arange(start, start + n, dtype=np.int64) if ids is None else _check_ids(ids, n)
        clash = np.intersect1d(ids_arr, self.ids(), assume_unique=True)
        if clash.size:
            raise UsageError(
                f"{clash.size} of the ids to add are already in the index (e.g. {int(clash[0])}); "
                f"new ids start at {start}"
            )
        with omp_threads(self._threads):
            self._index.add_with_ids(xb, ids_arr)
        self._meta["ntotal"] = self.ntotal
        self._meta["next_id"] = max(start, int(ids_arr.max()) + 1)
        self._meta["memory_bytes"] = estimate_memory(self.kind, self.ntotal, self.d, self.metric, **self._structure())
        self._meta["updated_at"] = _now()

    def ids(self) -> np.ndarray:
        """All ids in the index (int64, in storage order)."""
        faiss = _faiss()
        if self.kind in ("ivf", "ivfpq"):
            invlists = faiss.extract_index_ivf(self._index).invlists
            parts = []
            for lst in range(invlists.nlist):
                size = invlists.list_size(lst)
                if size:
                    parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
            return np.concatenate(parts) if parts else np.empty(0, np.int64)
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def _structure(self) -> dict[str, int]:
        return dict(self._meta["params"])

    def rebuilt(self, xb: np.ndarray, ids: Sequence[int] | np.ndarray | None = None) -> Index:
        """An index of the same kind, metric and parameters over new vectors *xb*.

        ivf and ivfpq keep their trained quantizers (no retraining: *xb* is assumed to
        come from the same distribution, e.g. its DBA-augmented version); flat and hnsw
        are built anew. The meta's ``source_meta`` is carried over.
        """
        faiss = _faiss()
        xb = check_vectors(xb, "xb", self.d)
        n = xb.shape[0]
        ids_arr = np.arange(n, dtype=np.int64) if ids is None else _check_ids(ids, n)
        if self.kind in ("ivf", "ivfpq"):
            t0 = time.perf_counter()
            with omp_threads(self._threads):
                index = faiss.clone_index(self._index)
                index.reset()
                index.add_with_ids(xb, ids_arr)
            meta = copy.deepcopy(self._meta)
            seconds = round(time.perf_counter() - t0, 3)
            meta.update(
                ntotal=int(index.ntotal),
                next_id=int(ids_arr.max()) + 1,
                build_seconds=seconds,
                train_seconds=0.0,
                add_seconds=seconds,
                built_at=_now(),
                memory_bytes=estimate_memory(self.kind, n, self.d, self.metric, **self._structure()),
            )
            for key in ("index_bytes", "index_file", "saved_at", "updated_at"):
                meta.pop(key, None)
            return Index(index, meta, threads=self._threads)
        return Index.build(
            xb,
            kind=self.kind,
            metric=self.metric,
            ids=ids_arr,
            seed=self._meta.get("seed", 0),
            threads=self._threads,
            source_meta=self._meta.get("source_meta"),
            **self._structure(),
        )

    def source_differences(self, source_meta: Mapping[str, Any], keys: Sequence[str] | None = None) -> dict[str, Any]:
        """``{key: (value recorded at build, value given)}`` for the keys that differ (default: all recorded keys)."""
        recorded = self._meta.get("source_meta") or {}
        given = _jsonable(dict(source_meta), "source_meta")
        missing = object()
        out = {}
        for key in recorded if keys is None else keys:
            a, b = recorded.get(key, missing), given.get(key, missing)
            if a != b:
                out[key] = (None if a is missing else a, None if b is missing else b)
        return out

    def verify_source(self, source_meta: Mapping[str, Any], keys: Sequence[str] | None = None) -> None:
        """Raise :class:`StoreError` unless *source_meta* (the store's meta) matches the one the index was built from."""
        if not self._meta.get("source_meta"):
            raise StoreError(
                "this index was built without source meta, so it cannot be checked against a store; rebuild it"
            )
        diff = self.source_differences(source_meta, keys)
        if diff:
            detail = "; ".join(f"{k}: index built from {a!r}, store has {b!r}" for k, (a, b) in diff.items())
            raise StoreError(
                f"the index does not belong to this store (or the store changed since): {detail}; rebuild it"
            )

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"Index(kind={self.kind!r}, metric={self.metric!r}, d={self.d}, ntotal={self.ntotal}, {params})"
