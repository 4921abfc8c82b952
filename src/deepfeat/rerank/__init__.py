"""Re-ranking of the global shortlist: diffusion (global, regional) and k-reciprocal nearest neighbours.

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
* ``regional-diffusion`` (Iscen et al. 2017, their main setting): the same diffusion on
  the mutual k-NN graph of the database's image *regions* (a regions section of the
  store, ``deepfeat local-features STORE --extractor regions``), seeded by the query's
  own regions, region scores pooled per image (:mod:`deepfeat.rerank.regional`).

Specs follow the pooling/index grammar: ``diffusion``, ``diffusion:k=50,alpha=0.99``,
``kreciprocal:k1=20,k2=6,lambda=0.3``, ``regional-diffusion:k=50,kq=50``; :func:`get_reranker`
parses them and names the valid choices on a mistake. Everything here is numpy/scipy on
N x D float32 arrays whose inner products are cosine similarities (the store's
post-processing normalises).

One module per idea: the specs and their registry (:mod:`.specs`), spec -> re-ranker
(:mod:`.build`), the shared base (:mod:`.base`), :mod:`.diffusion`, :mod:`.kreciprocal`, :mod:`.regional`.
"""

from deepfeat.rerank.base import Reranker, complete_ranking, rerank_ranks
from deepfeat.rerank.build import get_reranker
from deepfeat.rerank.diffusion import Diffusion, diffuse, knn_graph, solve, system_matrix
from deepfeat.rerank.kreciprocal import KReciprocal, k_reciprocal_distances
from deepfeat.rerank.regional import RegionalDiffusion, gmp_weights, seed_vector
from deepfeat.rerank.specs import (
    RERANKERS,
    RerankKind,
    canonical_spec,
    describe_rerankers,
    list_rerankers,
    parse_rerank_spec,
)

__all__ = ["RERANKERS", "RerankKind", "Reranker", "Diffusion", "KReciprocal", "RegionalDiffusion",
           "get_reranker", "parse_rerank_spec", "canonical_spec", "list_rerankers", "describe_rerankers", "knn_graph",
           "system_matrix", "diffuse", "solve", "k_reciprocal_distances", "gmp_weights", "seed_vector",
           "complete_ranking", "rerank_ranks"]
