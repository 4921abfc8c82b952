"""Retrieval evaluation: ground truth loaders and pure-numpy metrics.

Ground truth (:class:`GroundTruth`) is a list of :class:`Query` values whose relevant
and junk items are *database indices* (rows of a feature store), resolved once from
the names the ground-truth files use. Metrics take a ranking, either one list of ids
(:func:`average_precision`, :func:`precision_at_k`, ...) or a ``[Q, N]`` array of
database indices sorted by decreasing similarity (:func:`evaluate_ranks`).

Two AP definitions are implemented, each reproducing its reference program:

* :func:`average_precision`: Philbin et al.'s ``compute_ap.cpp`` for Oxford 5k /
  Paris 6k (CVPR 2007): junk items are skipped, positives are good + ok, and AP is
  the trapezoidal area under the precision-recall curve, accumulated in single
  precision exactly as the C++ program does, so the printed value matches it digit
  for digit.
* :func:`average_precision_revisited`: Radenovic et al.'s ``compute_ap`` /
  ``compute_map`` for the revisited ROxford / RParis easy, medium and hard protocols
  (CVPR 2018), in double precision, with its own mP@k definition.

Ties: metrics see only the order they are given; ties in similarity are resolved by
whoever produced the ranking. :func:`rank_by_similarity` sorts stably, so items with
equal scores keep database order (lower index first).

See docs/evaluation.md for the protocols, the formulas and the file formats.

The package: ``values`` (:class:`GroundTruth`, :class:`EvalResult` ...), ``metrics``
(one ranking), ``runner`` (:func:`rank_by_similarity`, :func:`evaluate_ranks`),
``names`` (ground-truth names -> database rows), ``loaders`` (folders, groups CSV,
UKBench, Oxford/Paris), ``revisited`` (ROxford / RParis) and ``spec``
(:func:`parse_gt_spec`). Every name is importable from ``deepfeat.evaluate``.
"""

from __future__ import annotations

from deepfeat.evaluate.loaders import class_folder_gt, groups_gt, load_oxford_gt, ukbench_gt
from deepfeat.evaluate.metrics import (
                      average_precision,
                      average_precision_revisited,
                      precision_at_k,
                      precision_at_k_revisited,
                      recall_at_k,
)
from deepfeat.evaluate.names import read_gt_lists, read_name_list
from deepfeat.evaluate.revisited import REVISITED_FORMAT, REVISITED_PROTOCOLS, load_revisited_gt, read_revisited_gnd
from deepfeat.evaluate.runner import evaluate_ranks, mean_average_precision, ns_score, rank_by_similarity
from deepfeat.evaluate.spec import parse_gt_spec
from deepfeat.evaluate.values import EvalResult, GroundTruth, Query, QueryResult

__all__ = [
    "REVISITED_FORMAT",
    "REVISITED_PROTOCOLS",
    "EvalResult",
    "GroundTruth",
    "Query",
    "QueryResult",
    "average_precision",
    "average_precision_revisited",
    "class_folder_gt",
    "evaluate_ranks",
    "groups_gt",
    "load_oxford_gt",
    "load_revisited_gt",
    "mean_average_precision",
    "ns_score",
    "parse_gt_spec",
    "precision_at_k",
    "precision_at_k_revisited",
    "rank_by_similarity",
    "read_gt_lists",
    "read_name_list",
    "read_revisited_gnd",
    "recall_at_k",
    "ukbench_gt",
]

