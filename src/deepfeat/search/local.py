"""A store's cached local features for a search: :class:`LocalSections`, each cached section
(:class:`deepfeat.localfeat.cache.LocalFeatureCache`, keypoints or regional descriptors) and
the extractor that computes a query's features as that section was made."""

from __future__ import annotations

from typing import Any

from deepfeat.search.queries import QueryEmbedder
from deepfeat.store import FeatureStore


class LocalSections:
    """The local-feature sections of *store*, opened on first use; a section made with the
    network (``cnn``, ``regions``) computes a query's with the *embedder*'s model."""

    def __init__(self, store: FeatureStore, embedder: QueryEmbedder):
        self.store = store
        self.embedder = embedder
        self._caches: dict[tuple[str | None, bool], Any] = {}
        self._extractors: dict[str | None, Any] = {}

    def cache(self, name: str | None = None, regions: bool = False):
        """The store's cached local features (:class:`deepfeat.localfeat.cache.LocalFeatureCache`);
        *regions*: a section of regional descriptors (for regional diffusion), not keypoints."""
        if (name, regions) not in self._caches:
            from deepfeat.localfeat.cache import LocalFeatureCache

            self._caches[(name, regions)] = LocalFeatureCache(self.store, name, regions=regions)
        return self._caches[(name, regions)]

    def extractor(self, cache):
        """The extractor that computes a query's features as *cache*'s section was made."""
        if cache.name not in self._extractors:
            from dataclasses import replace

            from deepfeat.localfeat.features import LocalExtractor, parse_local_spec

            spec = replace(parse_local_spec(cache.spec), layer=cache.meta.get("layer"))
            self._extractors[cache.name] = LocalExtractor(spec, self.embedder.model if spec.needs_model else None)
        return self._extractors[cache.name]
