"""A feature store as a search engine (see :mod:`deepfeat.search.engine`)."""

from .engine import (  # noqa: F401
    INDEX_DIR,
    DeepfeatError,
    Hit,
    SearchEngine,
    _drop_rows,
    build_index,
    index_source_meta,
    log,
    parse_bbox,
    rank_arrays,
)

__all__ = ["SearchEngine", "Hit", "build_index", "parse_bbox", "rank_arrays", "DeepfeatError"]
