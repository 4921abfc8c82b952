"""Re-ranking of the global shortlist: diffusion and k-reciprocal nearest neighbours.

Both take what the global search found (each query's shortlist of database rows, best
first) and re-order it using the structure of the database itself:

* ``diffusion`` (Iscen, Tolias, Avrithis, Furon & Chum, "Efficient diffusion on region
  manifolds", CVPR 2017). Offline: the mutual k-NN graph of the database (neighbours from
  the project's FAISS :class:`~deepfeat.index.Index`), affinities ``max(0, s)^gamma``.
  Per query: the subgraph of its top-``trunc`` global results, symmetrically normalised
  ``S = D^-1/2 A D^-1/2``, and ``(I - alpha S) f = y`` solved by conjugate gradient, where
  ``y`` holds the query's ``kq`` nearest similarities ``^gamma``. Results are ordered by
  ``f`` (then by the global score for nodes diffusion does not reach).
* ``kreciprocal`` (Zhong, Zheng, Cao & Li, "Re-ranking person re-identification with
  k-reciprocal encoding", CVPR 2017). Over the joint set queries + database (or, for a
  database larger than ``trunc``, each query + its top-``trunc`` shortlist):
  k-reciprocal sets ``R(p, k1)``, expanded by the ``R(c, round(k1/2))`` of their members
  that share at least 2/3 of their elements with it, Gaussian-kernel weights
  ``exp(-d)`` over the expanded set (rows summing to 1), local query expansion (mean of
  the vectors of the ``k2`` nearest), Jaccard distance, and
  ``d* = (1 - lambda) d_J + lambda d``.

Specs follow the pooling/index grammar: ``diffusion``, ``diffusion:k=50,alpha=0.99``,
``kreciprocal:k1=20,k2=6,lambda=0.3``; :func:`get_reranker` parses them and names the
valid choices on a mistake. Everything here is numpy/scipy on N x D float32 arrays whose
inner products are cosine similarities (the store's post-processing normalises).
"""

from .base import Reranker, _check_shortlist, _query_rows, complete_ranking, rerank_ranks
from .diffusion import Diffusion, diffuse, knn_graph, system_matrix
from .kreciprocal import KReciprocal, _reciprocal, k_reciprocal_distances
from .specs import (RERANKERS, RerankKind, RerankParam, canonical_spec, describe_rerankers, get_reranker,
                    list_rerankers, parse_rerank_spec)

__all__ = ["RERANKERS", "RerankKind", "RerankParam", "Reranker", "Diffusion", "KReciprocal", "get_reranker",
           "parse_rerank_spec", "canonical_spec", "list_rerankers", "describe_rerankers", "knn_graph",
           "system_matrix", "diffuse", "k_reciprocal_distances", "complete_ranking", "rerank_ranks"]
