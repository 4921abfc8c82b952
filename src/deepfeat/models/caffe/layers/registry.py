"""From a Caffe type name to its module: :func:`build_layer` and :func:`supported_types`.

Importing this module imports every layer family, whose builders register
themselves in :data:`~.base.BUILDERS`. Data sources, losses and metrics
(:data:`TRAINING_TYPES`) are not run: a deploy net has none, and asking for one
says so.
"""

from __future__ import annotations

from torch import nn

from deepfeat.errors import ModelError
from deepfeat.models.caffe.layers import activations, conv, normalization, pool, reshape  # noqa: F401 - each registers its builders
from deepfeat.models.caffe.layers.base import BUILDERS, Shape
from deepfeat.models.caffe.netdef import LayerDef
from deepfeat.models.caffe.wire import Blob

#: Layer types that only make sense when training (data sources, losses, metrics).
TRAINING_TYPES = frozenset({
    "Data", "ImageData", "HDF5Data", "HDF5Output", "MemoryData", "WindowData", "DummyData", "AnnotatedData",
    "VideoData", "SoftmaxWithLoss", "EuclideanLoss", "HingeLoss", "InfogainLoss", "MultinomialLogisticLoss",
    "SigmoidCrossEntropyLoss", "ContrastiveLoss", "Accuracy", "MultiBoxLoss",
})


def supported_types() -> list[str]:
    """The Caffe layer types deepfeat can run."""
    return sorted(set(BUILDERS) | {"Input"})


def build_layer(ld: LayerDef, in_shapes: list[Shape], blobs: list[Blob] | None) -> tuple[nn.Module, list[Shape]]:
    """The module for one layer and its output shapes (raises naming the layer on any problem)."""
    fn = BUILDERS.get(ld.type)
    if fn is None:
        if ld.type in TRAINING_TYPES:
            raise ModelError(
                f"{ld.label}: '{ld.type}' is a training-only layer (data source, loss or metric); use the deploy "
                "prototxt, whose input is an Input layer or an input:/input_shape declaration"
            )
        if ld.type == "Python":
            raise ModelError(f"{ld.label}: Python layers run user code inside Caffe and cannot be loaded")
        raise ModelError(f"{ld.label}: unknown layer type '{ld.type}'; supported types: "
                         f"{', '.join(supported_types())}")
    m = fn(ld, in_shapes, blobs)
    out = m.out_shapes(in_shapes)  # type: ignore[attr-defined]
    if len(out) != len(ld.tops):
        raise ModelError(f"{ld.label}: produces {len(out)} blob(s) but names {len(ld.tops)} top(s)")
    return m, out

