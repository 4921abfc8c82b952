"""A feature store as a search engine: queries embedded exactly as the store was made.

The package, one module per part:

* :mod:`deepfeat.search.engine`: :class:`SearchEngine` (the store, its index, search, full rankings);
* :mod:`deepfeat.search.queries`: queries (model and descriptor network from the store's meta,
  image files and boxes, stored rows/ids/paths, ``.npy`` vectors), :func:`parse_bbox`;
* :mod:`deepfeat.search.verification`: spatial verification with the store's local features;
* :mod:`deepfeat.search.regions`: a query's regional descriptors, for regional diffusion;
* :mod:`deepfeat.search.dba`: DBA vectors computed once and saved beside the index;
* :mod:`deepfeat.search.store_index`: the index saved in the store, :func:`build_index`;
* :mod:`deepfeat.search.ranking`: :func:`rank_arrays` (exact full rankings on arrays);
* :mod:`deepfeat.search.hits`: :class:`Hit`, one result.

Every name is importable from ``deepfeat.search`` as before.
"""

from __future__ import annotations

from deepfeat.errors import DeepfeatError
from deepfeat.search.engine import SearchEngine, log
from deepfeat.search.hits import Hit
from deepfeat.search.queries import parse_bbox
from deepfeat.search.ranking import _drop_rows, rank_arrays
from deepfeat.search.store_index import INDEX_DIR, build_index, index_source_meta

__all__ = ["SearchEngine", "Hit", "build_index", "parse_bbox", "rank_arrays", "DeepfeatError"]
