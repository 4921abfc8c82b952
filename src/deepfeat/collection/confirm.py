"""Confirming near-duplicate candidates by geometry: two photos of the same kind of scene
are as close in a global descriptor as a photo and its edited copy, but only the copy
has many local features that one similarity transform maps onto the other.

For each candidate pair the RANSAC inliers of a similarity transform between their
mutual-nearest-neighbour keypoint matches are counted (:func:`deepfeat.localfeat.verify.count_inliers`),
once as they are and once with the first image's keypoints mirrored (x -> W - x; SIFT
descriptors permuted to describe the mirrored patch, CNN ones kept since the network was
trained with flips), so a mirrored copy is confirmed too. A pair is confirmed with at least ``min_inliers`` inliers.

The local features come from the store's cached section of the same spec when it has
one (``deepfeat local-features STORE --extractor SPEC``), otherwise they are computed
for the candidate images only, kept in memory for this run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from deepfeat.errors import ImageError, StoreError
from deepfeat.localfeat.features import LocalFeatures, parse_local_spec
from deepfeat.localfeat.verify import VerifyParams, count_inliers
from deepfeat.store import FeatureStore

log = logging.getLogger(__name__)


def _sift_mirror_order() -> np.ndarray:
    """The permutation of a SIFT descriptor's 4 x 4 x 8 bins that describes the mirrored patch:
    rows of the keypoint's frame flip and orientations negate (bin o -> (8 - o) mod 8)."""
    idx = np.zeros(128, np.int64)
    for r in range(4):
        for c in range(4):
            for o in range(8):
                idx[((3 - r) * 4 + c) * 8 + (8 - o) % 8] = (r * 4 + c) * 8 + o
    return idx


_SIFT_MIRROR = _sift_mirror_order()


def mirrored(f: LocalFeatures, sift: bool = False) -> LocalFeatures:
    """The keypoints of the mirrored image: x mirrored across the image's width; SIFT
    descriptors permuted to describe the mirrored patches (CNN ones kept: the network
    was trained with flips, its activations change little)."""
    xy = np.array(f.xy, dtype=np.float32, copy=True)
    if len(xy):
        xy[:, 0] = f.image_size[0] - xy[:, 0]
    desc = np.ascontiguousarray(f.desc[:, _SIFT_MIRROR]) if sift and f.desc.shape[1] == 128 else f.desc
    return replace(f, xy=xy, desc=desc)


def pair_inliers(a: LocalFeatures, b: LocalFeatures, params: VerifyParams, mirror: bool = True,
                 sift: bool = False, enough: int | None = None) -> int:
    """Inliers between *a* and *b*: the better of as-is and *a* mirrored (tried only when
    as-is gives fewer than *enough*, default ``params.min_inliers``)."""
    n = count_inliers(a, b, params)
    if mirror and n < (params.min_inliers if enough is None else enough):
        n = max(n, count_inliers(mirrored(a, sift), b, params))
    return n


def _cached_section(store: FeatureStore, spec: str):
    """The store's cached keypoint section made with *spec*, or None."""
    from deepfeat.localfeat.cache import LocalFeatureCache, is_regions, local_feature_names, section_meta

    want = str(parse_local_spec(spec))
    for name in local_feature_names(store):
        meta = section_meta(store, name)
        if not is_regions(meta) and meta.get("spec") == want:
            return LocalFeatureCache(store, name=name)
    return None


def feature_source(store: FeatureStore, spec: str, device: str = "cpu") -> Callable[[int], LocalFeatures]:
    """A function row -> local features of that row's image: from the store's cached
    section of *spec* where it has the row's shard, otherwise computed once and kept."""
    cache = _cached_section(store, spec)
    if cache is not None:
        log.info("using the cached local features %r of %s", cache.name, store.path)
    paths = store.paths
    memo: dict[int, LocalFeatures] = {}
    extractor = None

    def compute(row: int) -> LocalFeatures:
        nonlocal extractor
        if extractor is None:
            from deepfeat.localfeat.cache import open_extractor

            extractor = open_extractor(store, spec, device)
        try:
            return extractor.extract(store.resolve_path(paths[row]))
        except ImageError as e:
            log.warning("local features of %s: %s", paths[row], e)
            return LocalFeatures.empty(1, extractor.spec.binary)

    def get(row: int) -> LocalFeatures:
        if row not in memo:
            try:
                memo[row] = cache[row] if cache is not None else compute(row)
            except StoreError as e:  # an unfinished section: compute this row instead
                log.warning("%s; computing instead", e)
                memo[row] = compute(row)
        return memo[row]

    return get


def confirm_pairs(a: np.ndarray, b: np.ndarray, features: Callable[[int], LocalFeatures], params: VerifyParams,
                  progress: Callable[[int, int], None] | None = None, spec: str = "cnn",
                  enough: int | None = None) -> np.ndarray:
    """Inliers of each candidate pair (a[i], b[i]) (int64 array); *spec* names the extractor."""
    out = np.zeros(len(a), np.int64)
    sift = parse_local_spec(spec).extractor == "sift"
    for i, (x, y) in enumerate(zip(np.asarray(a).tolist(), np.asarray(b).tolist())):
        out[i] = pair_inliers(features(x), features(y), params, sift=sift, enough=enough)
        if progress is not None:
            progress(i + 1, len(a))
    return out
