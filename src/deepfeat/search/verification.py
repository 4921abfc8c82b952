"""Spatial verification of a search's hits with the store's cached local features
(:mod:`deepfeat.localfeat.cache`, :mod:`deepfeat.localfeat.verify`): :class:`SpatialVerifier`."""

from __future__ import annotations

import os
from typing import BinaryIO, Sequence

from deepfeat.errors import UsageError
from deepfeat.search.hits import Hit
from deepfeat.search.local import LocalSections


class SpatialVerifier:
    """Re-orders hits by spatial verification against the store's local features (*local*)."""

    def __init__(self, local: LocalSections):
        self.local = local

    def query_features(self, image: str | os.PathLike | BinaryIO | None = None, row: int | None = None,
                       bbox: Sequence[float] | None = None, name: str | None = None):
        """Local features of a query: cached for a stored image (*row*), else computed from
        *image* like the cached ones; restricted to *bbox* (original pixels) if given."""
        cache = self.local.cache(name)
        if row is not None:
            return cache[row].within(bbox)
        if image is None:
            raise UsageError("spatial verification needs a query image or a stored query (vectors have no keypoints)")
        return self.local.extractor(cache).extract(image).within(bbox)

    def verify(self, hits: list[Hit], query_features, params, name: str | None = None) -> list[Hit]:
        """Re-order *hits* (one query's, best first) by spatial verification of the first
        ``params.top`` (:func:`deepfeat.localfeat.verify.verify_ranking`); verified hits carry inliers."""
        from dataclasses import replace

        from deepfeat.localfeat.verify import verify_ranking

        cache = self.local.cache(name)
        res = verify_ranking(query_features, [h.row for h in hits], cache.__getitem__, params)
        return [replace(hits[i], rank=k + 1, inliers=res.inliers.get(hits[i].row))
                for k, i in enumerate(res.order)]
