"""The evaluation protocol that ``deepfeat eval``, the sweep and the recipe share.

The queries of a ground truth -> their vectors (the stored vector of a whole-image query, a
fresh extraction of the region, or of an image the database does not hold, as the Oxford
protocol requires) -> full rankings (alpha-QE, DBA, re-ranking, then spatial verification of
the top N) -> an :class:`~deepfeat.evaluate.EvalResult`, in an :class:`Evaluation`.

* :class:`StoreEvaluation`: the protocol on a :class:`~deepfeat.search.engine.SearchEngine`
  (``deepfeat eval``);
* :class:`ArrayEvaluation`: the protocol on descriptor arrays (:mod:`deepfeat.tune.sweep`,
  :mod:`deepfeat.tune.recipe`);
* :func:`query_rows`, :func:`queries_to_embed`, :func:`stack_queries`, :func:`verify_ranks`:
  the steps both use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.search.engine import SearchEngine
from deepfeat.search.options import SearchOptions
from deepfeat.search.ranking import rank_arrays

if TYPE_CHECKING:
    from deepfeat.evaluate import EvalResult, GroundTruth, Query


@dataclass
class Evaluation:
    """One ground truth scored: the rankings (Q x N rows) and their :class:`EvalResult`;
    *rerank*: the re-ranker's cost (``Reranker.stats``), *verify_ms*: spatial verification,
    milliseconds per query (None without)."""

    result: EvalResult
    ranks: np.ndarray
    rerank: dict[str, Any] | None = None
    verify_ms: float | None = None


def query_rows(gt: GroundTruth) -> list[int | None]:
    """The database row of each whole-image query that is a database item (None for the others):
    it is its own first result, which k-reciprocal re-ranking counts once."""
    return [q.index if q.bbox is None else None for q in gt.queries]


def queries_to_embed(gt: GroundTruth, missing: str | None = None) -> list[Query]:
    """The queries whose vector is extracted afresh: those with a region, and those the database
    does not hold. A query whose image is nowhere to be found is refused (*missing*: the message,
    by default one naming the query)."""
    out = [q for q in gt.queries if q.bbox is not None or q.index is None]
    for q in out:
        if q.path is None:
            raise UsageError(missing or f"query {q.name}: its image {q.image} is not in the store; extract it too")
    return out


def stack_queries(gt: GroundTruth, xb: np.ndarray, embedded: np.ndarray) -> np.ndarray:
    """The query vectors (Q x D): a whole-image query's row of *xb*, else the next row of
    *embedded* (the vectors of :func:`queries_to_embed`, in its order)."""
    out, k = [], 0
    for q in gt.queries:
        if q.bbox is not None or q.index is None:
            out.append(embedded[k])
            k += 1
        else:
            out.append(xb[q.index])
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)


def verify_ranks(ranks: np.ndarray, gt: GroundTruth, query_features: Callable[[Query], Any],
                 db_features: Callable[[int], Any], params) -> tuple[np.ndarray, float]:
    """Rankings with each query's top ``params.top`` re-ordered by spatial verification
    (:func:`deepfeat.localfeat.verify.verify_rankings`); (ranks, ms per query)."""
    from deepfeat.localfeat.verify import verify_rankings

    return verify_rankings(ranks, lambda qi: query_features(gt.queries[qi]), db_features, params)


class StoreEvaluation:
    """The protocol on a store's :class:`SearchEngine`: rankings with *options*, verified with the
    store's local features (section *local*) when *verify* (``VerifyParams``) is given."""

    def __init__(self, engine: SearchEngine, options: SearchOptions | None = None,
                 ks: Sequence[int] = (1, 5, 10), verify: Any = None, local: str | None = None):
        self.engine = engine
        self.options = options or SearchOptions()
        self.ks = tuple(ks)
        self.verify = verify
        self.local = local

    def query_vectors(self, gt: GroundTruth) -> np.ndarray:
        """The stored vector of whole-image queries, a fresh (cropped) extraction for the others."""
        fresh = queries_to_embed(gt)
        e = self.engine
        embedded = (e.embed_images([e.store.resolve_path(q.path) for q in fresh], [q.bbox for q in fresh])
                    if fresh else np.zeros((0, e.xb.shape[1]), np.float32))
        return stack_queries(gt, e.xb, embedded)

    def evaluate(self, gt: GroundTruth) -> Evaluation:
        from deepfeat.evaluate import evaluate_ranks

        e, o = self.engine, self.options
        xq = self.query_vectors(gt)
        rows = query_rows(gt)
        regions, _ = e.regions_for(o, [(e.store.resolve_path(q.path) if q.index is None else None, q.index, q.bbox)
                                       for q in gt.queries])
        ranks = e.rank_all(xq, qe=o.qe, alpha=o.alpha, dba=o.dba, rerank=o.rerank, query_rows=rows,
                           query_regions=regions)
        verify_ms = None
        if self.verify:
            ranks, verify_ms = verify_ranks(ranks, gt, self._query_features,
                                            e.local_cache(self.local).__getitem__, self.verify)
        rerank = e.reranker(o.rerank, o.dba, o.alpha).stats if o.rerank else None
        return Evaluation(evaluate_ranks(ranks, gt, self.ks), ranks, rerank, verify_ms)

    def _query_features(self, q: Query):
        """A query's keypoints: the cached ones of its stored image (restricted to its region, if
        it has one), or computed from its file."""
        e = self.engine
        if q.index is not None:
            return e.query_local_features(row=q.index, bbox=q.bbox, name=self.local)
        if q.path is None:
            raise UsageError(f"query {q.name}: its image {q.image} is not in the store; extract it too")
        return e.query_local_features(image=e.store.resolve_path(q.path), bbox=q.bbox, name=self.local)


class ArrayEvaluation:
    """The protocol on arrays: *xq* (one row per query of *gt*, :func:`stack_queries`) against
    *xb*; *local_features*: each database row's local features, for :meth:`verified`. The exact
    rankings and the DBA vectors are computed once per setting and reused."""

    def __init__(self, xq: np.ndarray, xb: np.ndarray, gt: GroundTruth, ks: Sequence[int] = (1, 5, 10),
                 local_features: Sequence[Any] | None = None):
        self.xq = xq
        self.xb = xb
        self.gt = gt
        self.ks = tuple(ks)
        self.query_rows = query_rows(gt)
        self.local_features = local_features
        self._database: dict[tuple[int, float], np.ndarray] = {}
        self._exact: dict[tuple[int, float], np.ndarray] = {}

    def database(self, dba: int = 0, alpha: float = 0.0) -> np.ndarray:
        """*xb*, augmented with *dba* exact neighbours when asked."""
        from deepfeat.index import database_side_augmentation

        key = (int(dba), float(alpha))
        if not dba:
            return self.xb
        if key not in self._database:
            self._database[key] = database_side_augmentation(self.xb, dba, alpha)
        return self._database[key]

    def rank(self, options: SearchOptions | None = None) -> tuple[np.ndarray, Any]:
        """Full rankings with *options* (:func:`rank_arrays`), and the re-ranker used (or None)."""
        from deepfeat.evaluate import rank_by_similarity
        from deepfeat.rerank import get_reranker, rerank_ranks

        options = options or SearchOptions()
        xb = self.database(options.dba, options.alpha)
        r = get_reranker(options.rerank) if options.rerank else None
        rows = self.query_rows if not options.dba else None
        if options.qe:
            return rank_arrays(self.xq, xb, options.qe, options.alpha, r, rows), r
        key = (int(options.dba), float(options.alpha))
        if key not in self._exact:
            self._exact[key] = rank_by_similarity(self.xq, xb)
        ranks = self._exact[key]
        return (rerank_ranks(r, self.xq, xb, ranks, rows) if r is not None else ranks), r

    def evaluate(self, options: SearchOptions | None = None) -> Evaluation:
        from deepfeat.evaluate import evaluate_ranks

        ranks, r = self.rank(options)
        return Evaluation(evaluate_ranks(ranks, self.gt, self.ks), ranks, r.stats if r is not None else None)

    def verified(self, evaluation: Evaluation, params) -> Evaluation:
        """*evaluation*'s rankings with each query's top ``params.top`` spatially verified."""
        from deepfeat.evaluate import evaluate_ranks

        if self.local_features is None:
            raise UsageError("spatial verification needs the local features of the database")
        feats = self.local_features
        ranks, ms = verify_ranks(evaluation.ranks, self.gt, self._query_features,
                                 feats.__getitem__, params)
        return replace(evaluation, result=evaluate_ranks(ranks, self.gt, self.ks), ranks=ranks, verify_ms=ms)

    def _query_features(self, q: Query):
        if q.index is None:
            raise UsageError(f"query {q.name}: its image {q.image} is not in the dataset; its local features "
                             "are unknown")
        return self.local_features[q.index].within(q.bbox)
