"""Caffe layers as PyTorch modules, with Caffe's semantics to the last detail.

Each layer type has a builder that reads its ``*_param`` block (unknown fields are
refused, as Caffe's parser would), infers the output shapes from the input shapes
the way Caffe's ``Reshape`` does, and checks the caffemodel's blobs against the
shapes the prototxt implies (with Caffe's legacy 4-D shape rule). Module classes
subclass their torch counterparts where the semantics agree (``Convolution`` is an
``nn.Conv2d``, ``InnerProduct`` an ``nn.Linear``, ``ReLU`` an ``nn.ReLU``...), so
generic tooling recognises them; the Caffe details live in their ``forward``:

* pooling uses Caffe's output size (``ceil`` rounding, then dropping a last window
  that would start in the padding) and, for AVE, divides by the window size clipped
  to the padded input, not to the image (``count_include_pad`` semantics);
* LRN across channels is ``x / (k + alpha/n * sum x^2)^beta``; within a channel it
  is ``x / (1 + alpha/n^2 * sum x^2)^beta`` over an n x n zero-padded window (Caffe
  hard-codes the 1 there and ignores ``k``);
* BatchNorm divides the stored mean and variance by the moving-average factor
  (the third blob), or uses batch statistics if ``use_global_stats: false``;
* Dropout is the identity at test time (times ``1 - ratio`` if ``scale_train: false``).

Every module has ``caffe_blobs()``, the inverse of loading: its parameters in
Caffe's layout, so a net can be written back as a ``.caffemodel``.

One module per family, each holding its layer classes and their builders:

* :mod:`.base`: the checks and ``*_param`` readers every builder uses, the
  :class:`CaffeLayer` mixin, the ``BUILDERS`` table and the :func:`builder` decorator;
* :mod:`.conv`: Convolution, Deconvolution, InnerProduct;
* :mod:`.pool`: Pooling;
* :mod:`.normalization`: LRN, BatchNorm, Scale, Bias, MVN;
* :mod:`.activations`: ReLU, PReLU, Sigmoid, TanH, ELU, AbsVal, BNLL, Power, Exp,
  Log, Threshold, Dropout, Softmax;
* :mod:`.reshape`: Input, Top, Split, Silence, Flatten, Reshape, Concat, Slice,
  Crop, Tile, Eltwise;
* :mod:`.registry`: :func:`build_layer` / :func:`supported_types` (and the
  training-only types, which are refused).

The layer classes and the registry's functions are the package's API:
``from deepfeat.models.caffe.layers import Convolution``.
"""

from __future__ import annotations

from deepfeat.models.caffe.layers.activations import (
    BNLL,
    ELU,
    AbsVal,
    Dropout,
    Exp,
    LeakyReLU,
    Log,
    Power,
    PReLU,
    ReLU,
    Sigmoid,
    Softmax,
    TanH,
    Threshold,
)
from deepfeat.models.caffe.layers.base import BUILDERS, Builder, CaffeLayer, Shape, builder, take_blobs
from deepfeat.models.caffe.layers.conv import CONV_FIELDS, IP_FIELDS, Convolution, Deconvolution, InnerProduct, conv_out
from deepfeat.models.caffe.layers.normalization import LRN, LRN_FIELDS, MVN, BatchNorm, Bias, Scale
from deepfeat.models.caffe.layers.pool import POOL_FIELDS, Pooling, pool_out
from deepfeat.models.caffe.layers.registry import TRAINING_TYPES, build_layer, supported_types
from deepfeat.models.caffe.layers.reshape import (
    Concat,
    Crop,
    Eltwise,
    Flatten,
    Input,
    Reshape,
    Silence,
    Slice,
    Split,
    Tile,
    Top,
    reshape_shape,
)

__all__ = [
    "BNLL",
    "BUILDERS",
    "CONV_FIELDS",
    "ELU",
    "IP_FIELDS",
    "LRN",
    "LRN_FIELDS",
    "MVN",
    "POOL_FIELDS",
    "TRAINING_TYPES",
    "AbsVal",
    "BatchNorm",
    "Bias",
    "Builder",
    "CaffeLayer",
    "Concat",
    "Convolution",
    "Crop",
    "Deconvolution",
    "Dropout",
    "Eltwise",
    "Exp",
    "Flatten",
    "InnerProduct",
    "Input",
    "LeakyReLU",
    "Log",
    "PReLU",
    "Pooling",
    "Power",
    "ReLU",
    "Reshape",
    "Scale",
    "Shape",
    "Sigmoid",
    "Silence",
    "Slice",
    "Softmax",
    "Split",
    "TanH",
    "Threshold",
    "Tile",
    "Top",
    "build_layer",
    "builder",
    "conv_out",
    "pool_out",
    "reshape_shape",
    "supported_types",
    "take_blobs",
]
