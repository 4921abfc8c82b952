"""The ``onnx:`` model source: ``onnx:MODEL.onnx[?key=val&...]``, run by ONNX Runtime.

Any image model in ONNX form (exported from PyTorch, converted from Keras/TensorFlow
with tf2onnx, downloaded from a model zoo) becomes a deepfeat :class:`Model`: it
classifies, lists its tensors with shapes (``deepfeat layers``), and any
intermediate tensor can be tapped, pooled and extracted like a PyTorch layer.

An ONNX file says nothing about how its images were prepared, so the
preprocessing is given as options, in the spec after ``?`` (``&``-separated
``key=value``) or as keyword arguments of :func:`deepfeat.models.load_model`
(keywords win). The defaults are the PyTorch/ImageNet convention; they MUST be
set to what the model was trained with, or its predictions and features are
silently worse:

``input_size``  ``HxW`` or ``S``; default the graph's input size when static, else 224x224
``mean``        per-channel means after scaling, in the network's channel order
                (default ImageNet 0.485,0.456,0.406; ``none`` for 0)
``std``         per-channel stds (default ImageNet 0.229,0.224,0.225; ``none`` for 1)
``scale``       what a uint8 pixel is multiplied by first (default ``1/255``; ``1`` keeps 0..255)
``channel_order`` ``RGB`` (default), ``BGR`` or ``L`` (default for a 1-channel input)
``layout``      ``NCHW`` or ``NHWC``; default detected from the input shape (a
                trailing dimension of 1 or 3 means NHWC, as in Keras exports)
``interpolation`` resize filter (default ``bilinear``)
``crop_pct``    centre-crop fraction (default 0.875: resize to 256, crop 224)
``resize``      ``shorter`` (default: shorter side, aspect kept) or ``warp`` (both sides)
``output``      the tensor ``net`` returns (default the graph's first output)
``output_kind`` ``logits`` or ``probs``; default ``probs`` when the output comes from a
                ``Softmax`` node (through reshapes), else ``logits``
``labels``      a labels file (one per line; ``synset_words.txt`` works)
``tap_layout``  ``auto`` (default), ``NCHW`` or ``NHWC``: how tapped 4-D tensors are laid
                out in the graph (see below)
``threads``     ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``)

A graph whose input is ``uint8`` gets ``scale=1, mean=0, std=1`` by default and is fed
rounded 0..255 pixels.

Taps are ONNX tensor names (``deepfeat layers`` lists them; a node name means the
node's first output; ``output`` is the classifier output). Tapping builds a copy of
the graph cut down to the requested tensors, which become its outputs, so early
taps are cheap; one ONNX Runtime session is cached per set of names. Pooling wants
``N x C x H x W``: the layout of every 4-D tensor is tracked through the graph (the
input's layout, ``Transpose`` permutations, ``Conv``-like ops that are NCHW by
definition) and tensors that are NHWC in the graph (Keras models) are transposed
to ``N x C x H x W`` when tapped; ``tap_layout=NHWC``/``NCHW`` forces the choice.

A graph with a static batch dimension (often 1) is run in chunks of that size; a
graph with a static height and width only takes that size (``--size model`` or
``warp:HxW``).

The parts: :mod:`.options` (the spec and its option values), :mod:`.proto` (reading the
file, tensor facts, the input layout), :mod:`.graph` (:class:`OnnxGraph`: the analysis,
tap names), :mod:`.session` (running it on ONNX Runtime), :mod:`.listing` (its layer
table), :mod:`.net` (:class:`OnnxNet`, :class:`OnnxTaps`: the torch side) and
:mod:`.source` (:func:`load_onnx` and the registered source).
"""

from __future__ import annotations

from deepfeat.models.onnx_models.graph import OnnxGraph
from deepfeat.models.onnx_models.listing import GraphListing
from deepfeat.models.onnx_models.net import OnnxNet, OnnxTaps
from deepfeat.models.onnx_models.options import (
    DEFAULT_CROP_PCT,
    DEFAULT_INTERPOLATION,
    DEFAULT_SIZE,
    OPTIONS,
    TAP_LAYOUTS,
    split_onnx_spec,
)
from deepfeat.models.onnx_models.proto import LAYOUTS, detect_layout
from deepfeat.models.onnx_models.session import GraphSessions
from deepfeat.models.onnx_models.source import SOURCE, load_onnx

__all__ = [
    "DEFAULT_CROP_PCT", "DEFAULT_INTERPOLATION", "DEFAULT_SIZE", "LAYOUTS", "OPTIONS", "SOURCE", "TAP_LAYOUTS",
    "GraphListing", "GraphSessions", "OnnxGraph", "OnnxNet", "OnnxTaps", "detect_layout", "load_onnx",
    "split_onnx_spec",
]
