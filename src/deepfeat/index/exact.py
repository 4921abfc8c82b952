"""Exact k-NN in pure numpy (:func:`brute_force_search`, the ground truth of every index kind)
and the recall of a result against it (:func:`recall_at_k`)."""

from __future__ import annotations

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.index.checks import _check_k, _check_metric, check_vectors


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
