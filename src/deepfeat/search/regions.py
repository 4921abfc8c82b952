"""A query's regional descriptors for regional diffusion (:mod:`deepfeat.rerank.regional`),
read from or computed like the store's regions section (:mod:`deepfeat.localfeat.cache`)."""

from __future__ import annotations

import os
from typing import BinaryIO, Sequence

import numpy as np

from deepfeat.errors import UsageError


class RegionsMixin:
    """:class:`~deepfeat.search.engine.SearchEngine`'s query regions (uses the local-feature
    caches and extractors of :class:`~deepfeat.search.verification.VerificationMixin`)."""

    def query_regions(self, image: str | os.PathLike | BinaryIO | None = None, row: int | None = None,
                      bbox: Sequence[float] | None = None, name: str | None = None) -> np.ndarray:
        """Regional descriptors (R x D) of a query, for regional diffusion: cached for a stored
        image (*row*; with *bbox*, its regions at least half inside the box, or, when none is,
        the regions of the box cut out of its file), else computed from *image*, cut to *bbox*
        first as the global query descriptor is."""
        cache = self.local_cache(name, regions=True)
        if row is not None:
            inside = cache[row].within(bbox)
            if len(inside) or bbox is None:
                return inside.desc
            image = self.store.resolve_path(self.paths[row])
        if image is None:
            raise UsageError("regional diffusion needs a query image or a stored query (vectors have no regions)")
        return self._local_extractor(cache).extract(image, crop=bbox).desc
