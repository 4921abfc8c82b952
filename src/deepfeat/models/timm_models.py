"""Any timm architecture with a local weights file."""

from __future__ import annotations

import functools
import logging

import torch

from deepfeat.data.preprocess import DataConfig
from deepfeat.errors import ModelError, suggest
from deepfeat.models.base import Model, file_sha256
from deepfeat.models.labels import default_labels
from deepfeat.models.layouts import pre_logits_alias
from deepfeat.models.source import ModelSource, split_weights
from deepfeat.models.weights import build_with_weights

EXAMPLE = "timm:resnet50@resnet50.safetensors"

log = logging.getLogger(__name__)


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


def _create(arch: str, skip_init: bool = False, **kw) -> torch.nn.Module:
    """``timm.create_model`` with position embeddings interpolated to any input size
    (``dynamic_img_size=True``) where the architecture has the option (ViT, DeiT, EVA, Swin).
    *skip_init*: without timm's random initialisation where the architecture allows it
    (``weight_init='skip'``: ViT, Swin, ...), for a network whose every weight is loaded next (a
    ViT-S draws 22M truncated-normal values otherwise, most of the time it takes to build)."""
    import timm

    options: list[dict] = [{"dynamic_img_size": True}, {}]
    if skip_init:
        options = [{**o, "weight_init": "skip"} for o in options] + options
    for i, option in enumerate(options):
        try:
            return timm.create_model(arch, pretrained=False, **option, **kw)
        except TypeError:  # architectures without the option refuse the keyword
            if i == len(options) - 1:
                raise
    raise AssertionError("unreachable")


def _check_arch(arch: str) -> None:
    """*arch* is a timm architecture, or ``architecture.tag`` with a tag timm knows (the tag's
    pretrained config gives the preprocessing: mean, std, interpolation, input size, crop)."""
    import timm

    if not timm.is_model(arch):
        raise ModelError(f"timm has no architecture {arch!r}.{suggest(arch, timm.list_models())}")
    name, dot, tag = arch.partition(".")
    if dot:
        tags = timm.list_pretrained(name)
        if arch not in tags:
            raise ModelError(f"timm architecture {name!r} has no pretrained tag {tag!r}; its tags: "
                             f"{', '.join(tags) or '(none)'}")


class _TimmConverter:
    """timm's ``checkpoint_filter_fn`` of the architecture's module, the function timm itself runs on
    downloaded files: it converts original release layouts (DINOv2's ``dinov2_vits14_pretrain.pth``,
    OpenAI CLIP, ...) to timm's key names. Remembers whether it ran, for the model's meta."""

    def __init__(self) -> None:
        self.used: str | None = None

    def __call__(self, sd: dict[str, torch.Tensor], net: torch.nn.Module):
        import importlib

        module = importlib.import_module(type(net).__module__)
        fn = getattr(module, "checkpoint_filter_fn", None)
        if fn is None:
            return sd
        try:
            out = fn(sd, net)
        except Exception as e:  # a filter that does not know this layout
            raise ModelError(f"weights do not fit timm architecture {type(net).__name__} and "
                             f"{module.__name__}.checkpoint_filter_fn cannot convert them: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        self.used = f"{module.__name__}.checkpoint_filter_fn"
        log.info("weights converted by %s", self.used)
        return out


def load_timm(rest: str, spec: str, **_: object) -> Model:
    arch, weights = split_weights(rest, spec, "timm", EXAMPLE)
    _check_arch(arch)
    convert = None
    if weights == "random":
        net = _create(arch)
        sd_path = sha = None
    else:
        convert = _TimmConverter()
        net = build_with_weights(functools.partial(_create, arch, skip_init=True), weights, f"timm architecture {arch}",
                                 convert=convert)
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
                    "feature_layer": _feature_layer(net),
                    "weights_converted_by": convert.used if convert else None},
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
