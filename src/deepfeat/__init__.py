"""deepfeat: pretrained CNNs as image retrieval and classification systems.

The public API is re-exported here lazily (PEP 562), so that ``import deepfeat.data.images``
in a decode worker does not pay for importing torch.
"""

from __future__ import annotations

from deepfeat.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    # errors
    "DeepfeatError": "errors",
    "UsageError": "errors",
    "ModelError": "errors",
    "LayerError": "errors",
    "ImageError": "errors",
    "StoreError": "errors",
    "FormatError": "errors",
    # models and layers
    "Model": "models.base",
    "load_model": "models.registry",
    "Taps": "models.taps",
    "capture": "models.taps",
    "layer_table": "models.taps",
    # images and preprocessing
    "DataConfig": "data.preprocess",
    "SizePolicy": "data.preprocess",
    "parse_size_policy": "data.preprocess",
    "decode_image": "data.images",
    "discover": "data.images",
    # tasks
    "classify": "models.classify",
    "FeatureStore": "store",
    "extract": "pipeline",
    "ExtractConfig": "pipeline",
    "get_pooling": "pooling",
    "PostChain": "postprocess",
    "Index": "index",
    "SearchEngine": "search",
    "fully_convolutional": "surgery",
    "dense_map": "surgery",
    "Classifier": "collection.classifier",
    "find_duplicates": "collection.duplicates",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
