"""FAISS indexes, query expansion and DBA (see :mod:`deepfeat.index.faiss_index`)."""

from .faiss_index import *  # noqa: F401,F403
from .faiss_index import (  # noqa: F401
    INDEX_FILE,
    META_FILE,
    META_FORMAT,
    META_VERSION,
    __all__,
    hnsw_ef_search,
    ivf_nlist,
    ivf_nprobe,
    omp_threads,
    pq_m,
    pq_nbits,
)
