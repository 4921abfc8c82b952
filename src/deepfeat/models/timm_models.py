"""Any timm architecture with a local weights file."""

from __future__ import annotations

import functools

import torch

from deepfeat.data.preprocess import DataConfig
from deepfeat.errors import ModelError, suggest
from deepfeat.models.base import Model, file_sha256
from deepfeat.models.labels import default_labels
from deepfeat.models.layouts import pre_logits_alias
from deepfeat.models.source import ModelSource, split_weights
from deepfeat.models.weights import build_with_weights

EXAMPLE = "timm:resnet50@resnet50.safetensors"


def timm_data_config(net: torch.nn.Module) -> DataConfig:
    """The preprocessing timm itself would use for *net* (``resolve_model_data_config``); a network
    built with a dynamic image size takes any size, rounded to a multiple of its patch grid's stride."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(net)
    _, h, w = cfg["input_size"]
    dynamic = bool(getattr(net, "dynamic_img_size", False))
    return DataConfig(
        input_size=(int(h), int(w)),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic") or "bicubic",
        crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875),
        fixed_input_size=bool(getattr(net, "pretrained_cfg", {}).get("fixed_input_size", False)) and not dynamic,
        size_multiple=_size_multiple(net) if dynamic else 1,
    )


def _size_multiple(net: torch.nn.Module) -> int:
    """The stride of the coarsest feature map (ViT: the patch size; Swin: patch x 2^(stages-1))."""
    info = getattr(net, "feature_info", None) or []
    reductions = [int(f["reduction"]) for f in info if isinstance(f, dict) and "reduction" in f]
    return max(reductions) if reductions else 1


def _feature_layer(net: torch.nn.Module) -> str | None:
    """The module of timm's last ``feature_info`` entry (where ``forward_features`` ends, or nearly)."""
    info = getattr(net, "feature_info", None) or []
    last = info[-1] if info and isinstance(info[-1], dict) else {}
    return last.get("module")


def _create(arch: str, **kw) -> torch.nn.Module:
    """``timm.create_model`` with position embeddings interpolated to any input size
    (``dynamic_img_size=True``) where the architecture has the option (ViT, DeiT, EVA, Swin)."""
    import timm

    try:
        return timm.create_model(arch, pretrained=False, dynamic_img_size=True, **kw)
    except TypeError:  # architectures without the option refuse the keyword
        return timm.create_model(arch, pretrained=False, **kw)


def _check_arch(arch: str) -> None:
    import timm

    if not timm.is_model(arch):
        raise ModelError(f"timm has no architecture {arch!r}.{suggest(arch, timm.list_models())}")


def load_timm(rest: str, spec: str, **_: object) -> Model:
    arch, weights = split_weights(rest, spec, "timm", EXAMPLE)
    _check_arch(arch)
    if weights == "random":
        net = _create(arch)
        sd_path = sha = None
    else:
        net = build_with_weights(functools.partial(_create, arch), weights, f"timm architecture {arch}")
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
        extra_meta={"num_classes": n_out, "random_init": weights == "random",
                    "dynamic_img_size": bool(getattr(net, "dynamic_img_size", False)),
                    "feature_layer": _feature_layer(net)},
        layer_aliases=pre_logits_alias(net),
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
