"""Near-duplicate candidates: pairs of rows whose global descriptors are close, from a
k-NN search of every row against a FAISS index, one block of queries at a time.

Memory is the index plus one block of results (``block x k``), never an N x N matrix
(the wall imagededup users hit at 40k-1M images). Any index kind works: approximate
kinds (IVF, HNSW) may miss a pair the exact ``flat`` kind finds, as in search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from deepfeat.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class PairArrays:
    """Unordered pairs ``a < b`` of rows with their cosine similarity, as parallel arrays."""

    a: np.ndarray  # int64
    b: np.ndarray  # int64
    score: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.a)

    @classmethod
    def empty(cls) -> PairArrays:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def l2_normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows left at zero), as contiguous float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


def is_unit(x: np.ndarray, sample: int = 1000) -> bool:
    """Whether the rows of *x* (a sample of them) have unit length, so inner product = cosine."""
    rows = x[: min(len(x), sample)]
    return bool(len(rows) == 0 or np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3))


def knn_pairs(xb: np.ndarray, index, threshold: float, k: int = 10, block: int = 4096,
              rows: np.ndarray | None = None) -> PairArrays:
    """Pairs (a < b) of index ids whose similarity is at least *threshold*, among each
    query row's *k* nearest neighbours.

    *xb* holds the queries (unit rows, N x D float32; query i is index id ``rows[i]``,
    default i); *index* a :class:`deepfeat.index.Index` with metric ``ip`` over unit
    vectors. A pair found from both ends keeps its higher score."""
    if not -1.0 <= threshold <= 1.0:
        raise UsageError(f"the similarity threshold must be a cosine in [-1, 1], not {threshold}")
    if k < 1:
        raise UsageError(f"k (neighbours per image) must be at least 1, not {k}")
    if index.metric != "ip":
        raise UsageError(f"duplicates need an inner-product index over unit vectors, not metric {index.metric!r}")
    rows = np.arange(len(xb), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    kk = min(k + 1, index.ntotal)  # + the row itself
    parts_a, parts_b, parts_s = [], [], []
    for start in range(0, len(xb), block):
        D, I = index.search(np.ascontiguousarray(xb[start:start + block]), kk)
        q = np.repeat(rows[start:start + block], kk).reshape(-1, kk)
        keep = (I >= 0) & (I != q) & (D >= threshold)
        a, b, s = q[keep], I[keep], D[keep]
        parts_a.append(np.minimum(a, b))
        parts_b.append(np.maximum(a, b))
        parts_s.append(s.astype(np.float32))
    if not parts_a:
        return PairArrays.empty()
    a, b, s = np.concatenate(parts_a), np.concatenate(parts_b), np.concatenate(parts_s)
    return unique_pairs(a, b, s)


def unique_pairs(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> PairArrays:
    """One entry per (a, b), the highest score kept, sorted by (a, b)."""
    if len(a) == 0:
        return PairArrays.empty()
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return PairArrays(a[first].astype(np.int64), b[first].astype(np.int64), s[first].astype(np.float32))
