"""Spatial verification of a :class:`~deepfeat.search.engine.SearchEngine`'s hits with the store's
cached local features (:mod:`deepfeat.localfeat.cache`, :mod:`deepfeat.localfeat.verify`)."""

from __future__ import annotations

import os
from typing import BinaryIO, Sequence

from deepfeat.errors import UsageError
from deepfeat.search.hits import Hit


class VerificationMixin:
    """:class:`~deepfeat.search.engine.SearchEngine`'s spatial verification (:mod:`deepfeat.localfeat.verify`)."""

    def local_cache(self, name: str | None = None, regions: bool = False):
        """The store's cached local features (:class:`deepfeat.localfeat.cache.LocalFeatureCache`);
        *regions*: a section of regional descriptors (for regional diffusion), not keypoints."""
        if (name, regions) not in self._local:
            from deepfeat.localfeat.cache import LocalFeatureCache

            self._local[(name, regions)] = LocalFeatureCache(self.store, name, regions=regions)
        return self._local[(name, regions)]

    def query_local_features(self, image: str | os.PathLike | BinaryIO | None = None, row: int | None = None,
                             bbox: Sequence[float] | None = None, name: str | None = None):
        """Local features of a query: cached for a stored image (*row*), else computed from
        *image* like the cached ones; restricted to *bbox* (original pixels) if given."""
        cache = self.local_cache(name)
        if row is not None:
            return cache[row].within(bbox)
        if image is None:
            raise UsageError("spatial verification needs a query image or a stored query (vectors have no keypoints)")
        return self._local_extractor(cache).extract(image).within(bbox)

    def _local_extractor(self, cache):
        """The extractor that computes a query's features as *cache*'s section was made."""
        if cache.name not in self._local_x:
            from dataclasses import replace

            from deepfeat.localfeat.features import LocalExtractor, parse_local_spec

            spec = replace(parse_local_spec(cache.spec), layer=cache.meta.get("layer"))
            self._local_x[cache.name] = LocalExtractor(spec, self.model if spec.needs_model else None)
        return self._local_x[cache.name]

    def verify(self, hits: list[Hit], query_features, params, name: str | None = None) -> list[Hit]:
        """Re-order *hits* (one query's, best first) by spatial verification of the first
        ``params.top`` (:func:`deepfeat.localfeat.verify.verify_ranking`); verified hits carry inliers."""
        from dataclasses import replace

        from deepfeat.localfeat.verify import verify_ranking

        cache = self.local_cache(name)
        res = verify_ranking(query_features, [h.row for h in hits], cache.__getitem__, params)
        return [replace(hits[i], rank=k + 1, inliers=res.inliers.get(hits[i].row))
                for k, i in enumerate(res.order)]
