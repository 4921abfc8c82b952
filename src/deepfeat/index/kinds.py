"""The registry of index kinds, :data:`INDEX_KINDS`: each kind's parameters (defaults as
functions of n and d), its memory model and its FAISS factory string.

How ``auto`` picks among them and how a kind's parameters are resolved and checked is
:mod:`deepfeat.index.plan`; building, searching and saving is :mod:`deepfeat.index.faiss_index`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from deepfeat.errors import UsageError, suggest

#: below this many vectors ``auto`` picks ``flat``: exact, no training; one query scans at most
#: 200k x d floats (100 MB at d=128), batches amortise it.
FLAT_MAX_N = 200_000
#: up to this many vectors (and :data:`UNCOMPRESSED_MAX_BYTES` of raw float32) ``auto``
#: picks ``hnsw``: raw vectors kept, high recall at many times the throughput of brute force
#: (docs/benchmarks.md, "Search").
UNCOMPRESSED_MAX_N = 2_000_000
#: raw float32 vectors above this size are compressed (``ivfpq``) whatever n is.
UNCOMPRESSED_MAX_BYTES = 4 * 2**30

_PRECOMPUTED_TABLE_MAX_BYTES = 2 * 2**30  # faiss IndexIVFPQ::precomputed_table_max_bytes


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

    A trade-off measured by benchmarks/bench_search.py on clustered data (recall against
    nprobe: docs/benchmarks.md, "Search"). Raise ``Index.nprobe`` for recall; ``nprobe = nlist``
    makes IVF-Flat exact.
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

    Recall at a fixed efSearch drops as the graph grows (benchmarks/bench_search.py's clustered
    data; recall against efSearch: docs/benchmarks.md, "Search").
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
