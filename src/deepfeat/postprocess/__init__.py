"""Post-processing of pooled descriptors: L2, power law, PCA, PCA-whitening.

Everything here is numpy in, numpy out, on ``N x D`` float32 C-contiguous arrays
(rows are images). Fitted transforms are learned on one set of descriptors (a
training or "whitening" set) and applied to another, and they are saved as
self-describing ``.npz`` files: the arrays plus a JSON ``meta`` entry saying what
the file is, its dimensions, how many descriptors it was fitted on, the deepfeat
version and when it was made. Files are read with ``allow_pickle=False``.

A chain of steps is one string (see :class:`PostChain`)::

    none | step[,step...]
    step := l2 | power[:ALPHA] | sqrt | pca:DIM | pca-whiten:DIM[:shrink=S] | lw:DIM

e.g. ``l2``, ``power:0.5,l2``, ``pca:128``, ``pca-whiten:128,l2``,
``l2,pca-whiten:256:shrink=0.5,l2`` (the classic SPoC/R-MAC/CroW post-processing).

``lw:DIM`` is a whitening *learned* end to end with the network (``deepfeat finetune
--loss contrastive --whiten DIM``): an affine map ``x W^T + b`` that cannot be fitted
from descriptors alone, so it only exists in a saved chain file (the run's
``whitening.npz``). Wherever a chain is given (``extract --post``, ``postprocess
--post``), the path of a saved chain file (``.npz``) is accepted in place of a spec and
used as it is, fitted steps included: a PCA-whitening fitted on one collection (say
Paris) applied to another (Oxford), or a learned whitening.

The package: the transforms (:mod:`deepfeat.postprocess.transforms`: L2, power law,
PCA, learned whitening), the chain spec and its parser (:mod:`deepfeat.postprocess.spec`),
the chain itself (:mod:`deepfeat.postprocess.chain`) and the self-describing ``.npz``
file they are saved in (:mod:`deepfeat.postprocess.files`).
"""

from __future__ import annotations

from deepfeat.postprocess.chain import PostChain, is_chain_file, learned_whitening_chain, parse_post
from deepfeat.postprocess.files import CHAIN_FILE_KIND, FORMAT_VERSION, PCA_FILE_KIND
from deepfeat.postprocess.spec import CHAIN_GRAMMAR, STEP_NAMES
from deepfeat.postprocess.transforms import PCA, Affine, as_descriptors, l2n, power_law

__all__ = [
    "CHAIN_FILE_KIND", "CHAIN_GRAMMAR", "FORMAT_VERSION", "PCA", "PCA_FILE_KIND", "STEP_NAMES", "Affine",
    "PostChain", "as_descriptors", "is_chain_file", "l2n", "learned_whitening_chain", "parse_post", "power_law",
]
