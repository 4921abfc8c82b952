"""A query's regional descriptors for regional diffusion (:mod:`deepfeat.rerank.regional`),
read from or computed like the store's regions section (:mod:`deepfeat.localfeat.cache`):
:class:`QueryRegions`."""

from __future__ import annotations

import os
from typing import BinaryIO, Sequence

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.search.local import LocalSections


class QueryRegions:
    """Regional descriptors of queries, from the store's regions sections (*local*); *paths*:
    the stored path of each feature row."""

    def __init__(self, local: LocalSections, paths: Sequence[str]):
        self.local = local
        self.paths = paths

    def of(self, image: str | os.PathLike | BinaryIO | None = None, row: int | None = None,
           bbox: Sequence[float] | None = None, name: str | None = None) -> np.ndarray:
        """Regional descriptors (R x D) of a query: cached for a stored image (*row*; with *bbox*,
        its regions at least half inside the box, or, when none is, the regions of the box cut
        out of its file), else computed from *image*, cut to *bbox* first as the global query
        descriptor is."""
        cache = self.local.cache(name, regions=True)
        if row is not None:
            inside = cache[row].within(bbox)
            if len(inside) or bbox is None:
                return inside.desc
            image = self.local.store.resolve_path(self.paths[row])
        if image is None:
            raise UsageError("regional diffusion needs a query image or a stored query (vectors have no regions)")
        return self.local.extractor(cache).extract(image, crop=bbox).desc
