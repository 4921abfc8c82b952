"""Any torchvision classification architecture with a local weights file."""

from __future__ import annotations

import functools

import torch

from deepfeat.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from deepfeat.errors import ModelError, suggest
from deepfeat.models.base import Model, file_sha256
from deepfeat.models.labels import default_labels
from deepfeat.models.source import ModelSource, split_weights
from deepfeat.models.weights import build_with_weights

EXAMPLE = "torchvision:resnet18@resnet18-f37072fd.pth"


def find_classifier(net: torch.nn.Module, num_classes: int | None) -> str | None:
    """Name of the classifier: the last Linear (or, as in SqueezeNet, 1x1 conv) with
    *num_classes* outputs; the last Linear when the count is unknown."""
    name = None
    for n, m in net.named_modules():
        if isinstance(m, torch.nn.Linear) and (num_classes is None or m.out_features == num_classes):
            name = n
        elif isinstance(m, torch.nn.Conv2d) and num_classes is not None and m.out_channels == num_classes \
                and m.kernel_size == (1, 1):
            name = n
    return name


def _num_outputs(net: torch.nn.Module) -> int | None:
    n = getattr(net, "num_classes", None)
    if isinstance(n, int):
        return n
    last = find_classifier(net, None)
    return int(net.get_submodule(last).out_features) if last else None


def torchvision_data_config(arch: str) -> DataConfig:
    """Preprocessing from torchvision's own weight metadata (no download needed)."""
    from torchvision.models import get_model_weights

    try:
        t = get_model_weights(arch).DEFAULT.transforms()
    except Exception:  # architectures without published weights
        return DataConfig(input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    return DataConfig(
        input_size=(int(crop), int(crop)),
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
        interpolation=str(t.interpolation.value),
        crop_pct=float(crop) / float(resize),
    )


def load_torchvision(rest: str, spec: str, **_: object) -> Model:
    from torchvision.models import get_model, list_models

    arch, weights = split_weights(rest, spec, "torchvision", EXAMPLE)
    names = list_models()
    if arch not in names:
        raise ModelError(f"torchvision has no architecture {arch!r}.{suggest(arch, names)}")
    kwargs = {"aux_logits": False, "init_weights": False} if arch in ("inception_v3", "googlenet") else {}
    if weights == "random":
        net = get_model(arch, weights=None, **kwargs)
        path = sha = None
    else:
        # torchvision's published inception/googlenet weights carry the aux heads; drop them
        net = build_with_weights(functools.partial(get_model, arch, weights=None, **kwargs), weights,
                                 f"torchvision architecture {arch}", drop=("AuxLogits.", "aux1.", "aux2."))
        path, sha = weights, file_sha256(weights)
    n_out = _num_outputs(net)
    head = find_classifier(net, n_out)
    return Model(
        spec=spec,
        source="torchvision",
        arch=arch,
        net=net,
        data_config=torchvision_data_config(arch),
        labels=default_labels(n_out),
        weights_path=path,
        weights_sha256=sha,
        classifier=head,
        extra_meta={"num_classes": n_out, "random_init": weights == "random"},
    )


SOURCE = ModelSource(
    name="torchvision",
    prefix="torchvision",
    example=EXAMPLE,
    description="any torchvision classification architecture with a local weights file (or @random)",
    load=load_torchvision,
    ready=lambda: [],
    requires=("torchvision",),
)
