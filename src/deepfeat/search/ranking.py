"""Exact full rankings on arrays (alpha-QE, then a re-ranker), and the row filter of a search."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def rank_arrays(xq: np.ndarray, xb: np.ndarray, qe: int = 0, alpha: float = 0.0, reranker: Any = None,
                query_rows: Sequence[int | None] | None = None, index: Any = None, **rerank_inputs: Any) -> np.ndarray:
    """Exact full rankings (Q x N rows of *xb*, best first) with alpha-QE over *xb* (already
    DBA-augmented if wanted) and then *reranker*'s re-ordering of each shortlist. *query_rows*:
    each query's row in *xb* when it is a stored item (k-reciprocal counts it once); ignored
    after QE or DBA, which change the vectors; *rerank_inputs*: the re-ranker's own (the
    regions of regional diffusion). :meth:`SearchEngine.rank_all` on arrays."""
    from deepfeat.evaluate import rank_by_similarity
    from deepfeat.index import alpha_query_expansion

    ranks = rank_by_similarity(xq, xb)
    if qe:
        xq = alpha_query_expansion(xq, xb, ranks[:, :qe], None, qe, alpha)
        ranks = rank_by_similarity(xq, xb)
    if reranker is not None:
        from deepfeat.rerank import rerank_ranks

        ranks = rerank_ranks(reranker, xq, xb, ranks, query_rows if not qe else None, index=index, **rerank_inputs)
    return ranks


def drop_rows(I: np.ndarray, rows: Sequence[int | None], n: int) -> np.ndarray:
    """The first *n* neighbours of each query in *I* without the query's own row (*rows*), -1 padded."""
    out = np.full((I.shape[0], n), -1, dtype=I.dtype)
    for qi in range(I.shape[0]):
        keep = [i for i in I[qi] if i >= 0 and i != rows[qi]][:n]
        out[qi, : len(keep)] = keep
    return out
