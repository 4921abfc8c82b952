"""Any timm architecture with a local weights file."""

from __future__ import annotations

import functools

import torch

from deepfeat.data.preprocess import DataConfig
from deepfeat.errors import ModelError, suggest
from deepfeat.models.base import Model, file_sha256
from deepfeat.models.labels import default_labels
from deepfeat.models.source import ModelSource, split_weights
from deepfeat.models.weights import build_with_weights

EXAMPLE = "timm:resnet50@resnet50.safetensors"


def timm_data_config(net: torch.nn.Module) -> DataConfig:
    """The preprocessing timm itself would use for *net* (``resolve_model_data_config``)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(net)
    _, h, w = cfg["input_size"]
    return DataConfig(
        input_size=(int(h), int(w)),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic") or "bicubic",
        crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875),
        fixed_input_size=bool(getattr(net, "pretrained_cfg", {}).get("fixed_input_size", False)),
    )


def _check_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        raise ModelError(f"timm has no architecture {arch!r}.{suggest(arch, timm.list_models())}")


def load_timm(rest: str, spec: str, **_: object) -> Model:
    import timm

    arch, weights = split_weights(rest, spec, "timm", EXAMPLE)
    _check_arch(arch)
    if weights == "random":
        net = timm.create_model(arch, pretrained=False)
        sd_path = sha = None
    else:
        net = build_with_weights(functools.partial(timm.create_model, arch, pretrained=False), weights,
                                 f"timm architecture {arch}")
        sd_path, sha = weights, file_sha256(weights)
    classifier = net.pretrained_cfg.get("classifier")
    n_out = getattr(net, "num_classes", None)
    return Model(
        spec=spec,
        source="timm",
        arch=arch,
        net=net,
        data_config=timm_data_config(net),
        labels=default_labels(n_out),
        weights_path=sd_path,
        weights_sha256=sha,
        classifier=classifier if isinstance(classifier, str) else None,
        extra_meta={"num_classes": n_out, "random_init": weights == "random"},
    )


def ready() -> list[str]:
    return []


SOURCE = ModelSource(
    name="timm",
    prefix="timm",
    example=EXAMPLE,
    description="any timm architecture with a local .pth/.pt/.safetensors file (or @random)",
    load=load_timm,
    ready=ready,
    requires=("timm",),
)
