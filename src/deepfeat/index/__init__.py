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

The package, one module per part:

* :mod:`deepfeat.index.checks`: the lazy FAISS import, OpenMP threads, the input checks;
* :mod:`deepfeat.index.kinds`: the kind registry (parameters, memory models, factories);
* :mod:`deepfeat.index.plan`: the ``auto`` choice, parameter resolution, :class:`IndexPlan`;
* :mod:`deepfeat.index.faiss_index`: :class:`Index` (build, search, add, rebuild, source check);
* :mod:`deepfeat.index.persist`: ``index.faiss`` + ``index.json`` on disk;
* :mod:`deepfeat.index.exact`: exact numpy search and recall;
* :mod:`deepfeat.index.expansion`: AQE / alpha-QE, DBA, :func:`search_with_expansion`.
"""

from __future__ import annotations

from deepfeat.index.checks import METRICS, check_vectors, omp_threads
from deepfeat.index.exact import brute_force_search, recall_at_k
from deepfeat.index.expansion import (
    alpha_query_expansion,
    average_query_expansion,
    database_side_augmentation,
    dba_index,
    search_with_expansion,
)
from deepfeat.index.faiss_index import Index
from deepfeat.index.kinds import (
    FLAT_MAX_N,
    INDEX_KINDS,
    UNCOMPRESSED_MAX_BYTES,
    UNCOMPRESSED_MAX_N,
    IndexKind,
    get_kind,
    hnsw_ef_search,
    ivf_nlist,
    ivf_nprobe,
    list_kinds,
    pq_m,
    pq_nbits,
)
from deepfeat.index.persist import INDEX_FILE, META_FILE, META_FORMAT, META_VERSION
from deepfeat.index.plan import IndexPlan, choose_kind, default_params, estimate_memory, plan_index

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
