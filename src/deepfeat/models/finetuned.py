"""``finetuned:RUN_DIR``: a model fine-tuned by ``deepfeat finetune``, from its run directory.

The run's ``meta.json`` names the base model spec, the classes, the head and the
preprocessing; ``model.safetensors`` holds every tensor of the fine-tuned network with
the head stored as ``head_ft.*``. Loading rebuilds the base architecture (timm and
torchvision bases as ``@random``, so their original weight file is not needed: every
tensor is replaced), swaps in a head of the run's shape, and loads the file strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from deepfeat.data.preprocess import DataConfig
from deepfeat.errors import DeepfeatError, ModelError
from deepfeat.models.base import Model, file_sha256
from deepfeat.models.source import ModelSource

EXAMPLE = "finetuned:runs/flowers17"
META_FORMAT = "deepfeat-finetuned/1"


def run_dir_of(rest: str) -> Path:
    p = Path(os.path.expanduser(rest))
    if p.name == "meta.json":
        p = p.parent
    return p


def read_run_meta(run: Path, spec: str) -> dict:
    meta_path = run / "meta.json"
    if not run.is_dir():
        raise ModelError(f"{spec}: run directory not found: {run}")
    if not meta_path.is_file():
        hint = " (the run has snapshots but did not finish; continue it with `deepfeat finetune -o RUN --resume`)" \
            if (run / "snapshots").is_dir() else ""
        raise ModelError(f"{spec}: {run} has no meta.json, so it is not a finished fine-tuning run{hint}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{spec}: cannot read {meta_path}: {e}") from None
    if meta.get("format") != META_FORMAT:
        raise ModelError(f"{spec}: {meta_path} is not a deepfeat fine-tuned model (format {meta.get('format')!r})")
    return meta


def architecture_spec(base_spec: str) -> str:
    """The base spec to rebuild the architecture from: timm/torchvision as ``@random``."""
    prefix, sep, rest = base_spec.partition(":")
    if sep and prefix in ("timm", "torchvision"):
        arch = rest.partition("@")[0]
        return f"{prefix}:{arch}@random"
    return base_spec


def load_finetuned(rest: str, spec: str, *, load_base: Callable[..., Model], **options: object) -> Model:
    from deepfeat.models.heads import build_head, from_checkpoint, replace_head
    from deepfeat.models.weights import fit_state_dict, read_state_dict

    if not rest:
        raise ModelError(f"model spec {spec!r} names no run directory; e.g. {EXAMPLE}")
    run = run_dir_of(rest)
    meta = read_run_meta(run, spec)
    base_spec = meta["base_model"]["spec"]
    try:
        base = load_base(architecture_spec(base_spec), device="cpu", **options)
    except DeepfeatError as e:
        raise ModelError(f"{spec}: cannot rebuild the base model {base_spec!r}: {e}") from None
    head = meta["head"]
    net = base.net
    try:
        net.get_submodule(head["module"])
    except AttributeError:
        raise ModelError(f"{spec}: the base model has no module {head['module']!r} to hold the head") from None
    replace_head(net, head["module"], build_head(head))
    weights = run / meta.get("weights", "model.safetensors")
    if not weights.is_file():
        raise ModelError(f"{spec}: weights file missing: {weights}")
    sha = file_sha256(weights)
    if meta.get("weights_sha256") and meta["weights_sha256"] != sha:
        raise ModelError(f"{spec}: {weights.name} does not match the sha256 recorded in meta.json (the file was "
                         "changed or is corrupt)")
    sd = from_checkpoint(read_state_dict(weights), head["module"], str(weights))
    fit_state_dict(net, sd, f"fine-tuned run {run}")
    classes = list(meta["classes"])
    descriptor = meta.get("descriptor") or {}
    if len(classes) != int(head["num_classes"]):
        raise ModelError(f"{spec}: meta.json lists {len(classes)} classes but the head has {head['num_classes']}")
    return Model(
        spec=spec,
        source="finetuned",
        arch=base.arch,
        net=net,
        data_config=DataConfig.from_dict(meta["data_config"], mean_image=base.data_config.mean_image),
        labels=classes,
        weights_path=str(weights),
        weights_sha256=sha,
        classifier=head["module"],
        output_kind=base.output_kind,
        extra_meta={
            "num_classes": len(classes),
            "base_model": base_spec,
            "base_weights_sha256": meta["base_model"].get("weights_sha256"),
            # the run's descriptor (what --eval-retrieval measured): extract's --layer/--pool defaults
            "default_layer": descriptor.get("layer") or meta.get("default_layer"),
            **({"default_pooling": descriptor["pooling"]} if descriptor.get("pooling") else {}),
            "finetuned": {"run": str(run), "finished": meta.get("finished"),
                          "val_accuracy": meta.get("val_accuracy"),
                          **({"pooling": meta["metric_learning"]["pooling"]} if meta.get("metric_learning") else {}),
                          **({"descriptor": descriptor} if descriptor else {})},
        },
        layer_aliases=dict(base.layer_aliases),
    )


SOURCE = ModelSource(
    name="finetuned",
    prefix="finetuned",
    example=EXAMPLE,
    description="a model fine-tuned with `deepfeat finetune`, from its run directory",
    load=load_finetuned,
    ready=list,
    requires=("safetensors",),
    loads_base=True,
)
