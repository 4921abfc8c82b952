"""FAISS indexes over an N x D float32 feature matrix, query expansion and database-side augmentation.

The boundary is an N x D float32 C-contiguous matrix (``xb`` for the database, ``xq``
for queries) plus one int64 id per row; it is checked once, by :func:`check_vectors`,
and refused rather than silently copied when it is not in that form (a float64
matrix or a transposed D x N view is almost always a bug upstream, and a silent copy
of a memory-mapped store doubles its memory). Inside, the FAISS names are used:
``xb``, ``xq``, ``k``, ``D`` (scores) and ``I`` (ids, ``-1`` where there is no result).

Index kinds live in one registry, :data:`INDEX_KINDS`:

====== ======================================= ===========================================
kind   FAISS index                             when
====== ======================================= ===========================================
flat   ``IDMap,Flat`` (exact)                  n < 200,000 (:data:`FLAT_MAX_N`)
hnsw   ``IDMap,HNSW32`` (graph, raw vectors)    n < 2,000,000 and raw vectors <= 4 GiB
ivfpq  ``IVF{nlist},PQ{M}x{nbits}`` (compressed) beyond that
ivf    ``IVF{nlist},Flat`` (exact when          never picked by ``auto``; explicit choice
       nprobe = nlist)                         when appends are frequent or builds must be cheap
====== ======================================= ===========================================

``auto`` resolves with :func:`choose_kind` and :func:`plan_index` reports the chosen
parameters and the expected memory (:func:`estimate_memory`). See docs/search.md.

Metric ``ip`` on L2-normalised vectors is cosine similarity (higher is better);
``l2`` returns squared Euclidean distances (lower is better). On unit vectors both
give the same ranking.

Query expansion (AQE, alpha-QE) and database-side augmentation (DBA, alpha-DBA) are
pure numpy on N x D float32 and return re-normalised copies; :func:`search_with_expansion`
shows the order they are applied in.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..checksums import file_digest
from ..errors import DeepfeatError, StoreError, UsageError, suggest

if TYPE_CHECKING:  # pragma: no cover
    import faiss as _faiss_module

__all__ = [
    "FLAT_MAX_N",
    "INDEX_KINDS",
    "METRICS",
    "UNCOMPRESSED_MAX_BYTES",
    "UNCOMPRESSED_MAX_N",
    "Index",
    "IndexKind",
    "IndexPlan",
    "alpha_query_expansion",
    "average_query_expansion",
    "brute_force_search",
    "check_vectors",
    "choose_kind",
    "database_side_augmentation",
    "dba_index",
    "default_params",
    "estimate_memory",
    "get_kind",
    "list_kinds",
    "plan_index",
    "recall_at_k",
    "search_with_expansion",
]

METRICS = ("ip", "l2")

#: below this many vectors ``auto`` picks ``flat``: exact, no training; one query scans at most
#: 200k x d floats (100 MB at d=128, tens of ms at most on 2 cores), batches amortise it.
FLAT_MAX_N = 200_000
#: up to this many vectors (and :data:`UNCOMPRESSED_MAX_BYTES` of raw float32) ``auto``
#: picks ``hnsw``: raw vectors kept, recall@10 ~0.97 at ~19x the throughput of brute force (1M x 128).
UNCOMPRESSED_MAX_N = 2_000_000
#: raw float32 vectors above this size are compressed (``ivfpq``) whatever n is.
UNCOMPRESSED_MAX_BYTES = 4 * 2**30

META_FORMAT = "deepfeat-index"
META_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "index.json"

_FINITE_CHECK_ROWS = 65_536
_PRECOMPUTED_TABLE_MAX_BYTES = 2 * 2**30  # faiss IndexIVFPQ::precomputed_table_max_bytes


# --------------------------------------------------------------------------- faiss, threads


def _faiss() -> _faiss_module:
    """Import FAISS lazily: it is the optional ``[search]`` extra."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is installed in the dev environment
        raise DeepfeatError(
            f"FAISS is not installed ({e}): install the search extra, pip install 'deepfeat[search]'"
        ) from None
    return faiss


def _check_threads(threads: int | None) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise UsageError(f"threads must be a positive integer or None, not {threads!r}")
    return int(threads)


@contextlib.contextmanager
def omp_threads(threads: int | None) -> Iterator[None]:
    """Run FAISS with *threads* OpenMP threads (``faiss.omp_set_num_threads``), then restore."""
    threads = _check_threads(threads)
    if threads is None:
        yield
        return
    faiss = _faiss()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


# --------------------------------------------------------------------------- input checks


def check_vectors(x: Any, name: str = "xb", d: int | None = None) -> np.ndarray:
    """Return *x* if it is a non-empty, finite, N x D float32 C-contiguous numpy array.

    Anything else raises :class:`UsageError` saying what is wrong and how to fix it.
    Nothing is converted: float64 and non-contiguous inputs (e.g. a transposed D x N
    view) are refused, so that a layout or precision mistake upstream is seen here and
    a large matrix is never copied behind the caller's back.
    """
    if not isinstance(x, np.ndarray):
        raise UsageError(f"{name} must be a numpy array (N x D float32), not {type(x).__name__}")
    if x.ndim != 2:
        hint = f"; for one vector use {name}[None, :]" if x.ndim == 1 else ""
        raise UsageError(f"{name} must be 2-D (N x D), got shape {x.shape}{hint}")
    if x.dtype != np.float32:
        raise UsageError(
            f"{name} must be float32, got {x.dtype}: convert once with np.ascontiguousarray({name}, dtype=np.float32)"
        )
    if not x.flags.c_contiguous:
        raise UsageError(
            f"{name} must be C-contiguous (row-major N x D); a transposed D x N view or a column slice is not. "
            f"Check the layout, then copy with np.ascontiguousarray({name})"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise UsageError(f"{name} is empty: shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise UsageError(f"{name} has {x.shape[1]} dimensions, expected {d} (the index's / database's d)")
    for start in range(0, x.shape[0], _FINITE_CHECK_ROWS):
        block = x[start : start + _FINITE_CHECK_ROWS]
        ok = np.isfinite(block).all(axis=1)
        if not ok.all():
            row = start + int(np.argmin(ok))
            raise UsageError(f"{name} row {row} contains NaN or infinity")
    return x


def _check_ids(ids: Any, n: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise UsageError(f"ids must be a 1-D array of {n} integers (one per row), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise UsageError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and n and int(arr.max()) > np.iinfo(np.int64).max:
        raise UsageError("ids must fit in int64")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if n and int(arr.min()) < 0:
        raise UsageError(f"ids must be >= 0 (FAISS uses -1 for 'no result'), got {int(arr.min())}")
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.shape[0] != n:
        raise UsageError(f"ids must be unique; {int(uniq[np.argmax(counts > 1)])} appears more than once")
    return arr


def _check_k(k: Any, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise UsageError(f"{name} must be a positive integer, not {k!r}")
    return int(k)


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    return metric


# --------------------------------------------------------------------------- kind registry


def _pow2_round(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def _pow2_floor(x: float) -> int:
    return 1 << max(0, math.floor(math.log2(max(x, 1.0))))


def ivf_nlist(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest sqrt(n), at most n/39, in [1, 65536].

    FAISS suggests 4-16 sqrt(n) to minimise search cost at very large n; sqrt(n) keeps
    k-means training (>= 39 points per centroid, cost n_train x nlist x d) and adding
    (n x nlist x d) affordable on a 2-core machine, and each list then holds ~sqrt(n)
    vectors. At most n/39 so that k-means has the 39 points per centroid FAISS asks for.
    """
    return max(1, min(_pow2_round(math.sqrt(n)), _pow2_floor(n / 39), 65_536))


def ivf_nprobe(nlist: int) -> int:
    """Lists visited per query: nlist/16 (about 1/16 of the database scanned), at least 8, at most nlist.

    A trade-off measured by benchmarks/bench_search.py on clustered data (docs/benchmarks.md):
    IVF-Flat recall@10 0.94 at 200k vectors and 0.83 at 1M (nlist/8: 0.93 at 1M, at half
    the speed); IVF-PQ gets 0.64 at 1M, 96 % of what its 32-byte codes allow with
    nprobe=nlist/8 (0.67). Raise ``Index.nprobe`` for recall; ``nprobe = nlist`` makes
    IVF-Flat exact.
    """
    return min(nlist, max(8, nlist // 16))


def pq_m(d: int) -> int:
    """PQ sub-quantizers: the largest divisor of d that is <= d/4 and <= 64 (>= 4 dims each).

    d/4 bytes per vector at nbits=8 (32 bytes for d=128): a 16x compression of float32.
    """
    upper = max(1, min(64, d // 4))
    return max(m for m in range(1, upper + 1) if d % m == 0)


def pq_nbits(n: int) -> int:
    """Bits per PQ code: 8 (256 centroids per sub-quantizer, FAISS's fast path) from 9,984 = 39 x 256
    vectors on, fewer on small sets so that each sub-quantizer's k-means has 39 points per centroid."""
    return max(1, min(8, math.floor(math.log2(max(n / 39, 2.0)))))


def hnsw_ef_search(n: int) -> int:
    """HNSW candidate list at search time: 64 up to 10^5 vectors, 128 up to 10^6, doubling per decade, at most 512.

    Recall at a fixed efSearch drops as the graph grows: on benchmarks/bench_search.py's
    clustered data (docs/benchmarks.md) efSearch=64 gives recall@10 0.99 at 200k vectors
    but 0.93 at 1M, where 128 gives 0.97.
    """
    decades = max(0, math.ceil(math.log10(max(n, 1))) - 5)
    return min(512, 64 * 2**decades)


def _train_size(n: int, nlist: int, ksub: int = 0) -> int:
    return min(n, max(64 * nlist, 64 * ksub))


def _params_flat(n: int, d: int) -> dict[str, int]:
    return {}


def _params_ivf(n: int, d: int) -> dict[str, int]:
    nlist = ivf_nlist(n)
    return {"nlist": nlist, "nprobe": ivf_nprobe(nlist), "train_size": _train_size(n, nlist)}


def _params_ivfpq(n: int, d: int) -> dict[str, int]:
    nlist = ivf_nlist(n)
    nbits = pq_nbits(n)
    return {
        "nlist": nlist,
        "nprobe": ivf_nprobe(nlist),
        "M": pq_m(d),
        "nbits": nbits,
        "train_size": _train_size(n, nlist, 2**nbits),
    }


def _params_hnsw(n: int, d: int) -> dict[str, int]:
    return {"M": 32, "efConstruction": 40, "efSearch": hnsw_ef_search(n)}


def _memory_flat(n: int, d: int, p: Mapping[str, int], metric: str) -> int:
    return n * (4 * d + 8)  # vectors + id map


def _memory_ivf(n: int, d: int, p: Mapping[str, int], metric: str) -> int:
    return n * (4 * d + 8) + 4 * p["nlist"] * d  # codes + ids in the lists, centroids


def _memory_ivfpq(n: int, d: int, p: Mapping[str, int], metric: str) -> int:
    M, nbits, nlist = p["M"], p["nbits"], p["nlist"]
    code = (M * nbits + 7) // 8
    total = n * (code + 8) + 4 * nlist * d + 4 * d * 2**nbits  # codes + ids, centroids, PQ centroids
    table = 4 * nlist * M * 2**nbits  # precomputed residual tables (L2 only, built when small enough)
    if metric == "l2" and table <= _PRECOMPUTED_TABLE_MAX_BYTES:
        total += table
    return total


def _memory_hnsw(n: int, d: int, p: Mapping[str, int], metric: str) -> int:
    M = p["M"]
    # level 0 has 2M neighbour slots, each upper level M; P(level >= l) = M^-l, so E[upper levels] = 1/(M-1)
    links = 4 * (2 * M + M / (M - 1))
    return int(n * (4 * d + links + 4 + 8 + 8))  # vectors, links, level, offset, id map


def _factory_flat(d: int, p: Mapping[str, int]) -> str:
    return "IDMap,Flat"


def _factory_ivf(d: int, p: Mapping[str, int]) -> str:
    return f"IVF{p['nlist']},Flat"


def _factory_ivfpq(d: int, p: Mapping[str, int]) -> str:
    return f"IVF{p['nlist']},PQ{p['M']}x{p['nbits']}"


def _factory_hnsw(d: int, p: Mapping[str, int]) -> str:
    return f"IDMap,HNSW{p['M']}"


@dataclass(frozen=True)
class IndexKind:
    """One kind of index: its parameters (with defaults as functions of n and d), memory model and FAISS factory.

    ``search_params`` are those that can be changed on a built index; the others fix
    its structure. ``auto`` is an entry too (with no factory): it resolves to a
    concrete kind through :func:`choose_kind`.
    """

    name: str
    description: str
    exact: bool
    trains: bool
    params: tuple[str, ...] = ()
    search_params: tuple[str, ...] = ()
    defaults: Callable[[int, int], dict[str, int]] | None = None
    memory: Callable[[int, int, Mapping[str, int], str], int] | None = None
    factory: Callable[[int, Mapping[str, int]], str] | None = None


INDEX_KINDS: dict[str, IndexKind] = {
    "auto": IndexKind(
        "auto",
        f"flat below {FLAT_MAX_N:,} vectors, hnsw below {UNCOMPRESSED_MAX_N:,} (and <= 4 GiB of raw vectors), "
        "ivfpq beyond",
        exact=False,
        trains=False,
    ),
    "flat": IndexKind(
        "flat",
        "exact brute force (IndexFlat)",
        exact=True,
        trains=False,
        defaults=_params_flat,
        memory=_memory_flat,
        factory=_factory_flat,
    ),
    "ivf": IndexKind(
        "ivf",
        "inverted lists over raw vectors (IndexIVFFlat); exact when nprobe = nlist",
        exact=False,
        trains=True,
        params=("nlist", "nprobe", "train_size"),
        search_params=("nprobe",),
        defaults=_params_ivf,
        memory=_memory_ivf,
        factory=_factory_ivf,
    ),
    "ivfpq": IndexKind(
        "ivfpq",
        "inverted lists over product-quantized codes (IndexIVFPQ); compressed, approximate",
        exact=False,
        trains=True,
        params=("nlist", "nprobe", "M", "nbits", "train_size"),
        search_params=("nprobe",),
        defaults=_params_ivfpq,
        memory=_memory_ivfpq,
        factory=_factory_ivfpq,
    ),
    "hnsw": IndexKind(
        "hnsw",
        "hierarchical navigable small-world graph over raw vectors (IndexHNSWFlat); approximate",
        exact=False,
        trains=False,
        params=("M", "efConstruction", "efSearch"),
        search_params=("efSearch",),
        defaults=_params_hnsw,
        memory=_memory_hnsw,
        factory=_factory_hnsw,
    ),
}


def list_kinds() -> list[str]:
    """Names accepted as ``kind`` (``auto`` first)."""
    return list(INDEX_KINDS)


def get_kind(name: str) -> IndexKind:
    """The registry entry for *name*, or a :class:`UsageError` naming the valid kinds."""
    try:
        return INDEX_KINDS[name]
    except (KeyError, TypeError):
        raise UsageError(
            f"unknown index kind {name!r}; valid kinds: {', '.join(INDEX_KINDS)}.{suggest(str(name), INDEX_KINDS)}"
        ) from None


def choose_kind(n: int, d: int) -> str:
    """The concrete kind ``auto`` picks for n vectors of d dimensions.

    * ``flat`` below :data:`FLAT_MAX_N` (200k): exact, nothing to train or tune, and fast
      enough (a query scans at most 200k x d floats);
    * ``hnsw`` below :data:`UNCOMPRESSED_MAX_N` (2M) while the raw float32 vectors fit in
      :data:`UNCOMPRESSED_MAX_BYTES` (4 GiB): the fastest queries at high recall, no
      training, appends are cheap; memory is the raw vectors plus ~280 bytes per vector (M=32);
    * ``ivfpq`` beyond: ~d/4 + 8 bytes per vector instead of 4d, the only kind that
      fits tens of millions of vectors in memory, at lower recall.
    """
    if n < 0 or d < 1:
        raise UsageError(f"cannot choose an index kind for n={n}, d={d}")
    if n < FLAT_MAX_N:
        return "flat"
    if n < UNCOMPRESSED_MAX_N and 4 * n * d <= UNCOMPRESSED_MAX_BYTES:
        return "hnsw"
    return "ivfpq"


def _resolve_kind(kind: str, n: int, d: int) -> str:
    get_kind(kind)
    return choose_kind(n, d) if kind == "auto" else kind


def default_params(kind: str, n: int, d: int) -> dict[str, int]:
    """The parameters :meth:`Index.build` uses for *kind* on n x d data (``auto`` resolved first)."""
    spec = get_kind(_resolve_kind(kind, n, d))
    assert spec.defaults is not None  # every concrete kind has defaults
    return spec.defaults(n, d)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"index parameter {name} must be a positive integer, not {value!r}")
    return int(value)


def _resolve_params(kind: str, n: int, d: int, params: Mapping[str, Any]) -> dict[str, int]:
    spec = get_kind(kind)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        valid = ", ".join(spec.params) if spec.params else "none"
        raise UsageError(f"index kind {kind!r} has no parameter {', '.join(unknown)}; its parameters: {valid}")
    p = default_params(kind, n, d)
    for name, value in params.items():
        p[name] = _positive_int(name, value)
    if kind in ("ivf", "ivfpq"):
        if "train_size" not in params:  # follow a user's nlist / nbits
            p["train_size"] = _train_size(n, p["nlist"], 2 ** p.get("nbits", 0) if kind == "ivfpq" else 0)
        if p["nprobe"] > p["nlist"]:
            if "nprobe" in params:
                raise UsageError(f"nprobe ({p['nprobe']}) cannot exceed nlist ({p['nlist']})")
            p["nprobe"] = p["nlist"]
        if n and p["train_size"] > n:
            raise UsageError(f"train_size ({p['train_size']}) exceeds the number of vectors ({n})")
        if n and p["train_size"] < p["nlist"]:
            raise UsageError(
                f"{p['train_size']} training vectors cannot train nlist={p['nlist']} lists: use fewer lists "
                f"(nlist <= {p['train_size']}, ideally <= {max(1, p['train_size'] // 39)}) or kind='flat'"
            )
    if kind == "ivfpq":
        if d % p["M"]:
            raise UsageError(f"PQ sub-quantizers M={p['M']} must divide d={d}")
        if p["nbits"] > 16:
            raise UsageError(f"nbits must be between 1 and 16, not {p['nbits']}")
        if n and p["train_size"] < 2 ** p["nbits"]:
            raise UsageError(
                f"{p['train_size']} training vectors cannot train 2^{p['nbits']} PQ centroids: use a smaller nbits "
                f"(<= {int(math.log2(p['train_size']))}) or kind='flat'"
            )
    if kind == "hnsw" and p["M"] < 2:
        raise UsageError(f"HNSW M must be at least 2, not {p['M']}")
    return p


def estimate_memory(kind: str, n: int, d: int, metric: str = "ip", **params: Any) -> int:
    """Expected resident size in bytes of a *kind* index of n x d vectors (``auto`` resolved first).

    Counts what grows with n (vectors or codes, ids, HNSW links) and the trained tables
    (centroids, PQ codebooks, IVF-PQ's precomputed L2 tables); within a few percent of
    the saved file. While adding, IVF lists can briefly hold up to ~2x their codes.
    """
    _check_metric(metric)
    concrete = _resolve_kind(kind, n, d)
    p = _resolve_params(concrete, n, d, params)
    mem = INDEX_KINDS[concrete].memory
    assert mem is not None
    return int(mem(n, d, p, metric))


def _format_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"  # pragma: no cover


@dataclass(frozen=True)
class IndexPlan:
    """What :meth:`Index.build` will make: concrete kind, parameters, FAISS factory, expected memory."""

    kind: str
    requested: str
    n: int
    d: int
    metric: str
    params: dict[str, int] = field(default_factory=dict)
    factory: str = ""
    memory_bytes: int = 0

    @property
    def reason(self) -> str:
        if self.requested != "auto":
            return f"{self.kind} (requested)"
        raw = 4 * self.n * self.d
        if self.kind == "flat":
            why = f"n={self.n:,} < {FLAT_MAX_N:,}: exact search"
        elif self.kind == "hnsw":
            why = (
                f"{FLAT_MAX_N:,} <= n={self.n:,} < {UNCOMPRESSED_MAX_N:,} and raw vectors {_format_bytes(raw)} <= 4 GiB"
            )
        else:
            why = f"n={self.n:,} and raw vectors {_format_bytes(raw)}: compress"
        return f"auto -> {self.kind} ({why})"

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items()) or "no parameters"
        return (
            f"{self.reason}; {self.factory}, metric={self.metric}, {params}; "
            f"expected memory {_format_bytes(self.memory_bytes)}"
        )


def plan_index(n: int, d: int, kind: str = "auto", metric: str = "ip", **params: Any) -> IndexPlan:
    """Resolve *kind* (``auto`` by size) and its parameters for n x d data, with the expected memory."""
    _check_metric(metric)
    if n < 1 or d < 1:
        raise UsageError(f"cannot plan an index for n={n}, d={d}: need at least one vector of one dimension")
    concrete = _resolve_kind(kind, n, d)
    p = _resolve_params(concrete, n, d, params)
    spec = INDEX_KINDS[concrete]
    assert spec.factory is not None and spec.memory is not None
    return IndexPlan(
        kind=concrete,
        requested=kind,
        n=n,
        d=d,
        metric=metric,
        params=p,
        factory=spec.factory(d, p),
        memory_bytes=int(spec.memory(n, d, p, metric)),
    )


# --------------------------------------------------------------------------- the index


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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


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
                del sample
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
        if int(meta.get("format_version", 0)) > META_VERSION:
            raise StoreError(
                f"{meta_path} has index format version {meta['format_version']}; this deepfeat "
                f"({__version__}) reads up to {META_VERSION}: upgrade deepfeat"
            )
        index_path = meta_path.with_name(meta.get("index_file", index_path.name))
        if not index_path.is_file():
            raise StoreError(f"index file {index_path} is missing (its meta {meta_path} exists)")
        size = index_path.stat().st_size
        if "index_bytes" in meta and size != meta["index_bytes"]:
            raise StoreError(
                f"{index_path} has {size} bytes but its meta says {meta['index_bytes']}: truncated or replaced; rebuild"
            )
        try:
            index = faiss.read_index(str(index_path))
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
        return cls(index, meta, threads=_check_threads(threads))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``index.faiss`` and ``index.json`` into directory *path* (created if needed).

        A path ending in ``.faiss`` or ``.json`` names the pair instead (``x.faiss`` + ``x.json``).
        Each file is written to a temporary name and renamed, so a crash never leaves
        a half-written index under the real name. Returns the meta file's path.
        """
        faiss = _faiss()
        index_path, meta_path = _artefact_paths(path)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(index_path.name + ".tmp")
        faiss.write_index(self._index, str(tmp))  # straight to disk: no in-memory copy of a large index
        os.replace(tmp, index_path)
        self._meta["index_file"] = index_path.name
        digest = file_digest(index_path)  # checked by `deepfeat info --verify` (deepfeat.checksums)
        self._meta["index_bytes"] = digest["bytes"]
        self._meta["index_sha256"] = digest["sha256"]
        self._meta["saved_at"] = _now()
        text = json.dumps(self._meta, indent=2, sort_keys=False) + "\n"
        _atomic_write_bytes(meta_path, text.encode("utf-8"))
        return meta_path

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


# --------------------------------------------------------------------------- exact search in numpy


def brute_force_search(
    xq: np.ndarray, xb: np.ndarray, k: int, metric: str = "ip", block_bytes: int = 128 * 2**20
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN in pure numpy: ``(D, I)`` like :meth:`Index.search`, with I the row numbers of *xb*.

    Scores are computed block by block (a matmul of a query block against a database
    block of at most *block_bytes* of float32 scores), the k best of each block taken
    with ``argpartition`` and merged into a running top k, so memory stays bounded
    for any n. ``ip``: inner products, best = largest; ``l2``: squared distances
    ``|q|^2 - 2 q.x + |x|^2``, best = smallest. Ties are broken by the lower row number.
    Rows with fewer than k results (k > n) are padded with I = -1 and D = -inf (ip) / inf (l2).
    """
    _check_metric(metric)
    xq = check_vectors(xq, "xq")
    xb = check_vectors(xb, "xb", xq.shape[1])
    k = _check_k(k)
    nq, n = xq.shape[0], xb.shape[0]
    kk = min(k, n)
    q_block = max(1, min(nq, 4096))
    b_block = max(kk, block_bytes // (4 * q_block))
    sign = 1.0 if metric == "ip" else -1.0
    D = np.full((nq, k), -np.inf if metric == "ip" else np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    xb_sq = np.einsum("ij,ij->i", xb, xb) if metric == "l2" else None
    for qs in range(0, nq, q_block):
        q = xq[qs : qs + q_block]
        best_s = np.full((q.shape[0], kk), -np.inf, dtype=np.float32)
        best_i = np.full((q.shape[0], kk), -1, dtype=np.int64)
        q_sq = np.einsum("ij,ij->i", q, q)[:, None] if metric == "l2" else None
        for bs in range(0, n, b_block):
            s = q @ xb[bs : bs + b_block].T  # q_block x b_block, float32
            if metric == "l2":
                s *= 2.0
                s -= q_sq
                s -= xb_sq[bs : bs + b_block][None, :]  # = -(|q|^2 - 2 q.x + |x|^2)
            if s.shape[1] > kk:
                part = np.argpartition(s, s.shape[1] - kk, axis=1)[:, -kk:]
                s = np.take_along_axis(s, part, axis=1)
                cols = part + bs
            else:
                cols = np.broadcast_to(np.arange(bs, bs + s.shape[1]), s.shape)
            cand_s = np.concatenate([best_s, s], axis=1)
            cand_i = np.concatenate([best_i, cols], axis=1)
            keep = np.argpartition(cand_s, cand_s.shape[1] - kk, axis=1)[:, -kk:]
            best_s = np.take_along_axis(cand_s, keep, axis=1)
            best_i = np.take_along_axis(cand_i, keep, axis=1)
        # best first; equal scores by lower row number (-1 placeholders last)
        order = np.lexsort((np.where(best_i < 0, np.iinfo(np.int64).max, best_i), -best_s), axis=1)
        D[qs : qs + q.shape[0], :kk] = sign * np.take_along_axis(best_s, order, axis=1)
        I[qs : qs + q.shape[0], :kk] = np.take_along_axis(best_i, order, axis=1)
    return D, I


def recall_at_k(I: np.ndarray, I_true: np.ndarray, k: int | None = None) -> float:
    """Mean fraction of the true top k (``I_true[:, :k]``) found in ``I[:, :k]`` (k-NN recall, a.k.a. intersection@k)."""
    I, I_true = np.asarray(I), np.asarray(I_true)
    if I.ndim != 2 or I_true.ndim != 2 or I.shape[0] != I_true.shape[0]:
        raise UsageError(f"I and I_true must be nq x k arrays with the same nq, got {I.shape} and {I_true.shape}")
    k = min(I.shape[1], I_true.shape[1]) if k is None else _check_k(k)
    if k > I.shape[1] or k > I_true.shape[1]:
        raise UsageError(f"k={k} exceeds the results given ({I.shape[1]} and {I_true.shape[1]} columns)")
    a, b = I[:, :k], I_true[:, :k]
    hits = sum(int(np.isin(row_a[row_a >= 0], row_b[row_b >= 0]).sum()) for row_a, row_b in zip(a, b))
    return hits / (k * I.shape[0]) if I.shape[0] else 1.0


# --------------------------------------------------------------------------- query expansion, DBA


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in place (zero rows stay zero) and return x."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _check_neighbours(I: Any, rows: int, n: int, nb: int, name: str = "I") -> np.ndarray:
    I = np.asarray(I)
    if I.ndim != 2 or I.shape[0] != rows:
        raise UsageError(f"{name} must be a {rows} x k array of neighbour row numbers, got shape {I.shape}")
    if I.dtype.kind not in "iu":
        raise UsageError(f"{name} must hold integer row numbers, got dtype {I.dtype}")
    if I.shape[1] < n:
        raise UsageError(f"{name} has {I.shape[1]} neighbours per row; expansion with n={n} needs at least {n}")
    top = I[:, :n]
    if top.size and int(top.max()) >= nb:
        raise UsageError(
            f"{name} holds row number {int(top.max())} but xb has {nb} rows: neighbour ids must be row numbers of xb"
        )
    return top.astype(np.int64, copy=False)


def _check_count(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise UsageError(f"{name} must be a non-negative integer, not {n!r}")
    return int(n)


def _check_alpha(alpha: Any) -> float:
    alpha = 0.0 if alpha is None else alpha
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.floating, np.integer))
        or not (math.isfinite(alpha) and alpha >= 0)
    ):
        raise UsageError(f"alpha must be a finite number >= 0, not {alpha!r}")
    return float(alpha)


def _expand(
    x: np.ndarray,
    xb: np.ndarray,
    nbrs: np.ndarray,
    alpha: float,
    sims: np.ndarray | None = None,
    block_rows: int = 65_536,
) -> np.ndarray:
    """normalise(x_i + sum_j w_ij xb[nbrs_ij]) with w_ij = max(sim_ij, 0)^alpha (1 when alpha = 0); nbrs < 0 skipped.

    sim_ij is ``sims`` if given, else the exact inner product x_i . xb[nbrs_ij].
    """
    out = np.empty_like(x)
    for s in range(0, x.shape[0], block_rows):
        xs = x[s : s + block_rows]
        acc = xs.copy()
        nb = nbrs[s : s + block_rows]
        for j in range(nb.shape[1]):
            col = nb[:, j]
            valid = col >= 0
            v = xb[np.where(valid, col, 0)]
            if alpha == 0.0:
                w = valid.astype(np.float32)
            else:
                sim = sims[s : s + block_rows, j] if sims is not None else np.einsum("ij,ij->i", xs, v)
                w = np.where(valid, np.power(np.maximum(sim, 0.0), alpha), 0.0).astype(np.float32)
            acc += w[:, None] * v
        out[s : s + block_rows] = acc
    return _normalize_rows(out)


def average_query_expansion(xq: np.ndarray, xb: np.ndarray, I: np.ndarray, n: int) -> np.ndarray:
    """Average query expansion (AQE; Chum, Philbin, Sivic, Isard & Zisserman, ICCV 2007).

    Each query becomes the mean of itself and its top *n* results, re-normalised:
    ``q' = normalise(q + sum_{j<n} xb[I[:, j]])``. *I* holds row numbers of *xb*
    (the store's row ids), best first; ``-1`` entries are skipped. Returns a new
    nq x D float32 array; ``n = 0`` returns the normalised queries.
    """
    return alpha_query_expansion(xq, xb, I, None, n, 0.0)


def alpha_query_expansion(
    xq: np.ndarray, xb: np.ndarray, I: np.ndarray, D: np.ndarray | None, n: int, alpha: float
) -> np.ndarray:
    """alpha-weighted query expansion (alpha-QE; Radenović, Tolias & Chum, TPAMI 2019).

    ``q' = normalise(q + sum_{j<n} max(s_j, 0)^alpha xb[I[:, j]])`` where s_j is the
    cosine similarity of q to its j-th neighbour: the query has weight 1 (= s(q, q)^alpha)
    and close neighbours count more as alpha grows; negative similarities count 0.
    ``alpha = 0`` gives every neighbour weight 1, i.e. :func:`average_query_expansion`.
    *D* are those similarities from an ``ip`` search (nq x >= n); pass ``None`` to compute
    them exactly from the vectors, as one must after an ``l2`` search or a compressed
    (ivfpq) one whose scores are approximate.
    """
    xq = check_vectors(xq, "xq")
    xb = check_vectors(xb, "xb", xq.shape[1])
    n = _check_count(n, "n")
    alpha = _check_alpha(alpha)
    nbrs = _check_neighbours(I, xq.shape[0], n, xb.shape[0])
    sims = None
    if D is not None and alpha != 0.0:
        D = np.asarray(D)
        if D.shape[0] != xq.shape[0] or D.ndim != 2 or D.shape[1] < n:
            raise UsageError(f"D must be a {xq.shape[0]} x >={n} array of similarities, got shape {D.shape}")
        sims = D[:, :n].astype(np.float32)
    return _expand(xq, xb, nbrs, alpha, sims)


def _without_self(I: np.ndarray, n: int) -> np.ndarray:
    """Each row's first n neighbours other than the row itself (a database row is its own nearest
    neighbour), -1 where a row has fewer."""
    I = np.asarray(I, dtype=np.int64)
    drop = (I == np.arange(I.shape[0])[:, None]) | (I < 0)
    order = np.argsort(drop, axis=1, kind="stable")  # kept neighbours first, in rank order
    out = np.where(np.take_along_axis(drop, order, axis=1), -1, np.take_along_axis(I, order, axis=1))
    return out[:, :n]


def database_side_augmentation(
    xb: np.ndarray,
    n: int,
    alpha: float | None = None,
    index_or_knn: Index | tuple[np.ndarray | None, np.ndarray] | np.ndarray | None = None,
) -> np.ndarray:
    """Database-side augmentation (DBA; Arandjelović & Zisserman, CVPR 2012), alpha-weighted as in Radenović et al.

    Each database vector is replaced by ``normalise(x + sum_{j<n} w_j nn_j(x))`` over its
    *n* nearest other database vectors, with ``w_j = max(x . nn_j, 0)^alpha`` (``alpha``
    None or 0: plain average, A&Z; alpha > 0: alpha-DBA). Queries searched against the
    augmented database should be expanded with the same n and alpha (see
    :func:`search_with_expansion`). Neighbours come from *index_or_knn*: an :class:`Index`
    over *xb* with row numbers as ids (searched with k = n + 1), a precomputed ``(D, I)``
    pair or ``I`` array of each row's neighbours (self may be included: it is dropped),
    or None for exact numpy search (O(N^2 d): use an index beyond ~10^5 rows).
    """
    xb = check_vectors(xb, "xb")
    n = _check_count(n, "n")
    alpha = _check_alpha(alpha)
    N = xb.shape[0]
    if n == 0:
        return _normalize_rows(xb.copy())
    if index_or_knn is None:
        _, I = brute_force_search(xb, xb, min(n + 1, N), "ip")
    elif isinstance(index_or_knn, Index):
        if index_or_knn.ntotal != N:
            raise UsageError(f"the index holds {index_or_knn.ntotal} vectors but xb has {N} rows")
        _, I = index_or_knn.search(xb, min(n + 1, N))
    elif isinstance(index_or_knn, tuple):
        if len(index_or_knn) != 2:
            raise UsageError("index_or_knn as a tuple must be (D, I)")
        I = index_or_knn[1]
    else:
        I = index_or_knn
    I = np.asarray(I)
    n_used = min(n, N - 1)  # a row has at most N - 1 other rows
    if I.ndim != 2 or I.shape[0] != N or I.dtype.kind not in "iu":
        raise UsageError(f"the neighbour lists must be an integer {N} x k array, got {I.dtype} {I.shape}")
    if I.shape[1] < n_used:
        raise UsageError(f"DBA with n={n} needs at least {n_used} neighbours per row, got {I.shape[1]}")
    nbrs = _check_neighbours(_without_self(I, n_used), N, n_used, N)
    return _expand(xb, xb, nbrs, alpha)


def dba_index(index: Index, xb: np.ndarray, n: int, alpha: float | None = None) -> tuple[Index, np.ndarray]:
    """Augment the database (:func:`database_side_augmentation`, neighbours from *index*) and
    index the augmented vectors with the same kind and parameters (:meth:`Index.rebuilt`).

    Returns ``(augmented index, augmented xb)``; the index meta records
    ``augmentation = {"method": "dba", "n": n, "alpha": alpha}``. Do this once and save the
    result: it searches every database vector and rebuilds the index.
    """
    xb = check_vectors(xb, "xb", index.d)
    if index.ntotal != xb.shape[0]:
        raise UsageError(f"the index holds {index.ntotal} vectors but xb has {xb.shape[0]} rows")
    alpha = _check_alpha(alpha)
    xb_aug = database_side_augmentation(xb, n, alpha, index)
    augmented = index.rebuilt(xb_aug)
    augmented._meta["augmentation"] = {"method": "dba", "n": int(n), "alpha": alpha}
    return augmented, xb_aug


def search_with_expansion(
    index: Index, xq: np.ndarray, xb: np.ndarray, k: int, qe: int = 0, alpha: float = 0.0, dba: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Search with DBA and query expansion, in that order; returns ``(D, I)`` like :meth:`Index.search`.

    1. ``dba > 0``: every database vector is augmented with its *dba* neighbours and a
       temporary index of the same kind and parameters is built over the result
       (:func:`dba_index`; IVF quantizers are reused, flat/HNSW rebuilt), so an
       approximate index stays approximate and an exact one exact;
    2. first search of the (original) queries for their top *qe*;
    3. ``qe > 0``: alpha-QE over the (augmented) database vectors, weights sim^alpha
       (alpha = 0: AQE);
    4. second search of the expanded queries for the top *k*.

    The same alpha weights DBA and QE, and QE averages the same (augmented) vectors the
    index holds, so queries and database go through the same transformation. *xb* is
    the database the index was built from, with row numbers as ids. DBA costs a search
    of the whole database and a rebuild: for repeated searches call :func:`dba_index`
    once and pass its results here with ``dba=0``.
    """
    xq = check_vectors(xq, "xq", index.d)
    xb = check_vectors(xb, "xb", index.d)
    k = _check_k(k)
    qe = _check_count(qe, "qe")
    dba = _check_count(dba, "dba")
    alpha = _check_alpha(alpha)
    if index.ntotal != xb.shape[0]:
        raise UsageError(f"the index holds {index.ntotal} vectors but xb has {xb.shape[0]} rows")
    if dba:
        index, xb = dba_index(index, xb, dba, alpha)
    if not qe:
        return index.search(xq, k)
    _, I0 = index.search(xq, qe)
    xq_expanded = alpha_query_expansion(xq, xb, I0, None, qe, alpha)
    return index.search(xq_expanded, k)
