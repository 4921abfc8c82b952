"""Pooling: turn an ``N x C x H x W`` activation into ``N x D`` descriptors.

Each method of the literature is a pure tensor function (``sum_pool``,
``avg_pool``, ``spoc``, ``mac``, ``gem``, ``rmac``, ``rgem``, ``crow``, ``mop``),
plus a name registry so any layer can be pooled any way from one string::

    get_pooling("gem:p=3")          # or gem:3
    get_pooling("rmac:L=3")
    get_pooling("rmac+mac")         # concatenation of L2-normalised parts
    get_pooling("crow:a=2,b=2")
    get_pooling("none")             # an already pooled N x D layer passes through

Spec grammar: ``part ("+" part)*`` with ``part = name[:arg[,arg...]]`` and
``arg = key=value`` or a bare value for the method's parameters in order
(``gem:3`` is ``gem:p=3``). :data:`POOLINGS` lists the methods with their
parameters, one-line summary and citation.

The functions use torch operations only (loops run over regions derived from the
shape, never over data values), so a :class:`Pooling` can sit inside a graph
exported by ``torch.onnx.export(..., dynamo=False)`` at a fixed input shape, on
any device, in any float dtype.

Spatial poolings need ``N x C x H x W`` maps of any size (1 x 1 included) and
reject ``N x D`` input with a :class:`~deepfeat.errors.UsageError` pointing to
``none``; treating a vector as a 1 x 1 map would silently change it (GeM clamps
negatives, CroW re-weights), so deepfeat refuses instead.

Multi-scale: :func:`combine_scales` sums or generalised-means per-scale vectors;
:meth:`Pooling.multiscale` applies the method's own rule (regional poolings sum
their regional vectors over all scales before the final L2, as Tolias et al. and
Gordo et al. do); :func:`pool_multiscale` runs a feature extractor on rescaled
copies of a batch and does both.

The package keeps the pure functions apart from the registry (as cirtorch keeps
``functional.py`` apart from ``pooling.py``): ``common`` (EPS, L2), ``global_pool``
(none, sum, avg, SPoC, MAC, GeM), ``regional`` (the R-MAC grid, R-MAC, rGeM),
``crow_weighting`` (CroW), ``multiscale`` (scale combination), ``mop`` (MOP-CNN's
windows, VLAD, k-means, levels); then ``registry`` (:data:`POOLINGS`), ``spec``
(:func:`get_pooling`), ``modules`` (:class:`Pooling`, :class:`ConcatPooling`) and
``mop_pooling`` (:class:`MOPPooling`), ``spec`` (:func:`get_pooling`, :func:`load_pooling`, :func:`pool_multiscale`). Every name is
importable from ``deepfeat.pooling``.
"""

from __future__ import annotations

from deepfeat.pooling.common import EPS, l2_normalize  # noqa: F401  (EPS is public but not in __all__)
from deepfeat.pooling.crow_weighting import crow
from deepfeat.pooling.global_pool import avg_pool, gem, mac, no_pool, spoc, spoc_center_prior, sum_pool
from deepfeat.pooling.modules import ConcatPooling, GeM, Pooling
from deepfeat.pooling.mop import VLADLevel, kmeans, layer_stride, mop_encode, mop_patch_grid, mop_windows, vlad
from deepfeat.pooling.mop_pooling import MOPPooling
from deepfeat.pooling.multiscale import (
    COMBINE_MODES,
    DEFAULT_SCALES,
    combine_scales,
    parse_scales,
    rescale,
)
from deepfeat.pooling.regional import regional_sum, regional_vectors, rgem, rmac, rmac_regions
from deepfeat.pooling.registry import POOLINGS, Param, PoolingKind, describe_poolings, list_poolings
from deepfeat.pooling.spec import get_pooling, load_pooling, pool_multiscale

__all__ = [
    "COMBINE_MODES", "DEFAULT_SCALES", "POOLINGS", "ConcatPooling", "GeM", "MOPPooling", "Param", "Pooling",
    "PoolingKind", "VLADLevel", "avg_pool", "combine_scales", "crow", "describe_poolings", "gem", "get_pooling",
    "kmeans", "l2_normalize", "layer_stride", "list_poolings", "load_pooling", "mac", "mop_encode",
    "mop_patch_grid", "mop_windows", "no_pool", "parse_scales", "pool_multiscale", "regional_sum",
    "regional_vectors", "rescale", "rgem", "rmac", "rmac_regions", "spoc", "spoc_center_prior", "sum_pool", "vlad",
]
