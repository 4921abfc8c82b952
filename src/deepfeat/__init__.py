"""deepfeat: pretrained CNNs as image retrieval and classification systems."""

__version__ = "0.1.0"

from .errors import DeepfeatError, ImageError, LayerError, ModelError, StoreError, UsageError  # noqa: E402
from .models import Model, load_model  # noqa: E402
from .taps import Taps, capture, layer_table  # noqa: E402
from .classify import classify  # noqa: E402
from .images import decode_image, discover  # noqa: E402
from .preprocess import DataConfig, SizePolicy, parse_size_policy  # noqa: E402

__all__ = [
    "DataConfig",
    "DeepfeatError",
    "ImageError",
    "LayerError",
    "Model",
    "ModelError",
    "SizePolicy",
    "StoreError",
    "Taps",
    "UsageError",
    "capture",
    "classify",
    "decode_image",
    "discover",
    "layer_table",
    "load_model",
    "parse_size_policy",
]
