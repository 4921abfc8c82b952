"""A feature store as a search engine: queries embedded exactly as the store was made.

The package, one module per part:

* :mod:`deepfeat.search.engine`: :class:`SearchEngine` (the store, its index, search, full
  rankings), which holds the collaborators below and delegates to them;
* :mod:`deepfeat.search.store_index`: the index saved in the store, :func:`build_index`,
  :class:`~deepfeat.search.store_index.StoreIndex` (saved or exact);
* :mod:`deepfeat.search.queries`: :class:`~deepfeat.search.queries.QueryEmbedder` (model and
  descriptor network from the store's meta, image files and boxes), :func:`parse_bbox`;
* :mod:`deepfeat.search.local`: the store's cached local features and their query extractors;
* :mod:`deepfeat.search.verification`: spatial verification of hits;
* :mod:`deepfeat.search.regions`: a query's regional descriptors, for regional diffusion;
* :mod:`deepfeat.search.dba`: :class:`~deepfeat.search.dba.DBACache`, DBA vectors saved beside the index;
* :mod:`deepfeat.search.ranking`: :func:`rank_arrays` (exact full rankings on arrays);
* :mod:`deepfeat.search.options`: :class:`SearchOptions` (QE, DBA, re-ranking);
* :mod:`deepfeat.search.request`: one ``deepfeat search`` (:class:`~deepfeat.search.request.SearchRequest`);
* :mod:`deepfeat.search.evaluation`: the evaluation protocol ``eval``, the sweep and the recipe share;
* :mod:`deepfeat.search.hits`: :class:`Hit`, one result.
"""

from __future__ import annotations

from deepfeat.errors import DeepfeatError
from deepfeat.search.engine import SearchEngine
from deepfeat.search.hits import Hit
from deepfeat.search.options import SearchOptions
from deepfeat.search.queries import parse_bbox
from deepfeat.search.ranking import rank_arrays
from deepfeat.search.store_index import build_index

__all__ = ["SearchEngine", "SearchOptions", "Hit", "build_index", "parse_bbox", "rank_arrays", "DeepfeatError"]
