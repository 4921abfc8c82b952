"""Spatial verification: re-score the top of a global ranking by geometric agreement.

For a query and each of its top-N database images (:mod:`deepfeat.localfeat.features`):

1. **match** descriptors by mutual nearest neighbours (cosine similarity for float
   descriptors, Hamming distance for binary ones), optionally with Lowe's ratio test;
2. **fit** a geometric model to the matched keypoint positions with RANSAC (OpenCV):
   ``similarity`` (rotation + uniform scale + translation,
   ``cv2.estimateAffinePartial2D``; the default), ``affine``
   (``cv2.estimateAffine2D``) or ``homography`` (``cv2.findHomography``). The
   reprojection threshold is ``ransac`` times the keypoints' own size (a CNN
   keypoint's stride, in the database image's pixels), so it follows each image's
   resolution;
3. **blend** the inlier count with the candidate's place in the incoming ranking
   (position ``i`` = 0, 1, ... of the N verified):

       score = (1 - i / N) + weight * min(inliers, cap) / cap    (inliers >= min_inliers)
       score = (1 - i / N)                                        (otherwise)

   and re-sort the top N by it (ties keep the incoming order). The global term is the
   rank, not the raw similarity, so verification composes with any re-ranking before
   it (QE, DBA, diffusion, k-reciprocal: their scores are on different scales) and
   gives the same order in ``search`` and ``eval``. With the defaults (weight 1, cap
   30) an image with 30 inliers rises above every unverified one; images below the
   top N keep their order after the verified block.

:class:`VerifyParams` holds these settings; :func:`parse_verify_spec` reads
``N[:key=value,...]`` (e.g. ``20``, ``20:weight=2,cap=30,model=homography``): the grammar
of :mod:`deepfeat.specs` with the number of results in the place of a name.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.localfeat.features import LocalFeatures, require_cv2
from deepfeat.specs import Param, SpecKind, format_float_g, register_spec_kind

GEOMETRIES = ("similarity", "affine", "homography")


@dataclass(frozen=True)
class _VerifyKind:
    name: str
    params: tuple[Param, ...]


#: the parameters after ``N:``; their ranges are checked by :class:`VerifyParams`
VERIFY_KIND = _VerifyKind("verify", (
    Param("weight", "float", 1.0, "a float"), Param("cap", "int", 30, "a int"),
    Param("min_inliers", "int", 5, "a int"), Param("ransac", "float", 1.0, "a float"),
    Param("ratio", "float", 0.0, "a float"),
    Param("model", "choice", "similarity", "a geometry (choose " + ", ".join(GEOMETRIES) + ")",
          choices=GEOMETRIES)))
_NOT_ONE_OF = "--verify {raw!r}: {arg!r} is not one of {keyed}"
VERIFY_SPECS = SpecKind("spatial verification", {"verify": VERIFY_KIND}, float_format=format_float_g, messages={
    "unknown_param": _NOT_ONE_OF, "positional": _NOT_ONE_OF,
    "bad_value": "--verify {raw!r}: {key} must be {rule}, got {value!r}",
})


@dataclass(frozen=True)
class VerifyParams:
    """How many results to verify and how inliers change their scores (module docstring)."""

    top: int = 20
    weight: float = 1.0
    cap: int = 30
    min_inliers: int = 5
    ransac: float = 1.0
    ratio: float = 0.0  # Lowe's ratio test on top of mutual NN (0 = off)
    model: str = "similarity"

    def __post_init__(self) -> None:
        if self.top < 1:
            raise UsageError(f"--verify N: N must be at least 1, not {self.top}")
        if self.cap < 1 or self.min_inliers < 0 or not self.weight >= 0 or not self.ransac > 0:
            raise UsageError("verification needs cap >= 1, min_inliers >= 0, weight >= 0 and ransac > 0")
        if not 0 <= self.ratio < 1:
            raise UsageError(f"verification ratio must be in [0, 1) (0 = off), not {self.ratio}")
        if self.model not in GEOMETRIES:
            raise UsageError(f"verification model {self.model!r} unknown; choose {', '.join(GEOMETRIES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def spec(self) -> str:
        """``N:weight=...,cap=...,...`` with every setting written out."""
        return f"{self.top}:" + VERIFY_SPECS.canonical(VERIFY_KIND, asdict(self)).partition(":")[2]


def parse_verify_spec(text: str | int | VerifyParams | None) -> VerifyParams | None:
    """``N`` or ``N:key=value,...`` (keys: weight, cap, min_inliers, ransac, ratio, model);
    ``0``/None/empty -> no verification."""
    if text is None or isinstance(text, VerifyParams):
        return text
    if isinstance(text, int):
        return VerifyParams(top=text) if text else None
    raw = str(text).strip()
    if not raw:
        return None
    head, _, argstr = raw.partition(":")
    try:
        top = int(head)
    except ValueError:
        raise UsageError(f"--verify {raw!r}: give N (results to verify), optionally N:key=value,...") from None
    if top == 0:
        return None
    params, given = VERIFY_SPECS.parse_args(VERIFY_KIND, argstr, raw)
    return VerifyParams(top=top, **{k: params[k] for k in given})


register_spec_kind("verify", VERIFY_SPECS, lambda s: parse_verify_spec(s).spec)


def mutual_matches(qd: np.ndarray, dd: np.ndarray, binary: bool = False, ratio: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(qi, di)`` of mutual nearest neighbours between two descriptor sets."""
    if len(qd) == 0 or len(dd) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if binary:
        # Hamming distance of the packed bits, as a similarity: -distance
        qw = np.ascontiguousarray(qd).view(np.uint64)
        dw = np.ascontiguousarray(dd).view(np.uint64)
        x = np.zeros((len(qd), len(dd)), np.int32)
        for j in range(qw.shape[1]):
            x += np.bitwise_count(qw[:, j, None] ^ dw[None, :, j])
        sim = -x.astype(np.float32)
    else:
        sim = qd.astype(np.float32) @ dd.astype(np.float32).T
    best_d = sim.argmax(1)
    best_q = sim.argmax(0)
    qi = np.flatnonzero(best_q[best_d] == np.arange(len(qd)))
    di = best_d[qi]
    if ratio and sim.shape[1] > 1:
        # Lowe's test on distances: for unit vectors d^2 = 2 - 2 sim
        part = -np.partition(-sim[qi], 1, axis=1)[:, :2]
        d1, d2 = (np.sqrt(np.maximum(2 - 2 * part[:, 0], 0)), np.sqrt(np.maximum(2 - 2 * part[:, 1], 0))) \
            if not binary else (-part[:, 0], -part[:, 1])
        ok = d1 < ratio * np.maximum(d2, 1e-12)
        qi, di = qi[ok], di[ok]
    return qi, di


def count_inliers(q: LocalFeatures, d: LocalFeatures, params: VerifyParams) -> int:
    """RANSAC inliers of the geometric model between the mutual matches of *q* and *d*."""
    qi, di = mutual_matches(q.desc, d.desc, q.binary, params.ratio)
    need = 4 if params.model == "homography" else 3
    if len(qi) < max(need, params.min_inliers):
        return 0
    cv2 = require_cv2()
    src = np.ascontiguousarray(q.xy[qi], dtype=np.float32)
    dst = np.ascontiguousarray(d.xy[di], dtype=np.float32)
    thr = float(params.ransac * np.median(d.sizes[di])) if len(d.sizes) else 3.0
    cv2.setRNGSeed(0)  # the same inputs give the same inliers
    if params.model == "homography":
        _, mask = cv2.findHomography(src, dst, cv2.RANSAC, thr, maxIters=1000, confidence=0.995)
    elif params.model == "affine":
        _, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=thr, maxIters=1000,
                                       confidence=0.995, refineIters=0)
    else:
        _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=thr,
                                              maxIters=1000, confidence=0.995, refineIters=0)
    return int(mask.sum()) if mask is not None else 0


def blended_score(position: int, n: int, inliers: int, params: VerifyParams) -> float:
    """The module docstring's formula, for the candidate at *position* of *n* verified."""
    score = 1.0 - position / max(n, 1)
    if inliers < params.min_inliers:
        return score
    return score + params.weight * min(inliers, params.cap) / params.cap


@dataclass
class VerifiedRanking:
    """Rows in their new order (``order[k]``: the incoming position of the new k-th), the
    verification scores of the top N, and the inliers of every verified row."""

    rows: np.ndarray
    order: np.ndarray
    scores: np.ndarray
    inliers: dict[int, int]
    seconds: float


def verify_ranking(query: LocalFeatures, rows: Sequence[int], db_features: Callable[[int], LocalFeatures],
                   params: VerifyParams) -> VerifiedRanking:
    """Re-score the first ``params.top`` of a ranking (database *rows*, best first) by
    spatial verification of their local features against the query's."""
    t0 = time.perf_counter()
    rows = np.asarray(rows)
    n = min(params.top, len(rows))
    inl = {int(r): count_inliers(query, db_features(int(r)), params) for r in rows[:n]}
    new = np.array([blended_score(i, n, inl[int(r)], params) for i, r in enumerate(rows[:n])])
    top = np.argsort(-new, kind="stable")
    order = np.concatenate([top, np.arange(n, len(rows))]).astype(np.int64)
    return VerifiedRanking(rows[order], order, new[top], inl, time.perf_counter() - t0)


def verify_rankings(ranks: np.ndarray, query_features: Callable[[int], LocalFeatures],
                    db_features: Callable[[int], LocalFeatures], params: VerifyParams) -> tuple[np.ndarray, float]:
    """Q x N rankings (database rows) with each query's top N re-ordered by
    :func:`verify_ranking`; *query_features(i)* gives query i's local features.
    Returns (new ranks, milliseconds per query)."""
    ranks = np.array(ranks, copy=True)
    n = min(params.top, ranks.shape[1])
    t0 = time.perf_counter()
    for qi in range(len(ranks)):
        ranks[qi, :n] = verify_ranking(query_features(qi), ranks[qi, :n], db_features, params).rows
    return ranks, 1000 * (time.perf_counter() - t0) / max(len(ranks), 1)
