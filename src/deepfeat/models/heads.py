"""The head of a fine-tuned network, as far as loading one needs it.

``deepfeat finetune`` replaces the base model's classifier module (``Model.classifier``:
``classifier`` for EfficientNet, ``fc`` for ResNets, ``classifier.6`` for VGG) in place
by a new layer with one output per user class, so every layer name of the base model
stays valid. In checkpoints the new layer's tensors are stored under another name,
:data:`HEAD_NAME` (``head_ft.weight``, ``head_ft.bias``), as Caffe users rename ``fc8``
to ``fc8_flickr``: the base model's weight files have no such keys, so old ImageNet
weights can never be loaded into the new head, and a fine-tuned file loaded as the base
model fails loudly.

This module holds what ``finetuned:RUN_DIR`` (:mod:`deepfeat.models.finetuned`) needs to
rebuild such a network: the head modules, their spec in ``meta.json``, putting a head in
place and the checkpoint renaming. Making and training a head is
:mod:`deepfeat.finetune.heads`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from deepfeat.errors import ModelError

HEAD_NAME = "head_ft"


class CosineHead(torch.nn.Module):
    """``scale x cos(x, w_c)``: the logits of a classifier on the L2-normalised input
    against L2-normalised class weights, no bias (NormFace, Wang et al. 2017; the
    normalised softmax of Zhai & Wu, *Classification is a strong baseline for deep metric
    learning*, BMVC 2019). Its loss keeps pulling each image's normalised feature towards
    its class direction until the cosine is large, so the head's input, read as a
    descriptor, ends up clustered by class; an ordinary linear head stops pushing as
    soon as the classes are separable."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(num_classes)
        self.weight = torch.nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.register_buffer("scale", torch.tensor(float(scale)))
        torch.nn.init.normal_(self.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.normalize(x.flatten(1), dim=1)
        return self.scale * torch.nn.functional.linear(x, torch.nn.functional.normalize(self.weight, dim=1))


def head_spec(head: torch.nn.Module) -> dict:
    """What the finetuned loader needs to rebuild the head."""
    if isinstance(head, CosineHead):
        return {"kind": "cosine", "in_features": head.in_features, "num_classes": head.out_features,
                "scale": float(head.scale)}
    if isinstance(head, torch.nn.Linear):
        return {"kind": "linear", "in_features": head.in_features, "num_classes": head.out_features}
    if isinstance(head, torch.nn.Conv2d):
        return {"kind": "conv1x1", "in_features": head.in_channels, "num_classes": head.out_channels}
    raise ModelError(f"unsupported head type {type(head).__name__}")


def build_head(spec: Mapping) -> torch.nn.Module:
    kind = spec.get("kind")
    if kind == "linear":
        return torch.nn.Linear(int(spec["in_features"]), int(spec["num_classes"]))
    if kind == "conv1x1":
        return torch.nn.Conv2d(int(spec["in_features"]), int(spec["num_classes"]), 1)
    if kind == "cosine":
        return CosineHead(int(spec["in_features"]), int(spec["num_classes"]), float(spec.get("scale", 16.0)))
    raise ModelError(f"unknown head kind {kind!r} in the fine-tuned meta")


def replace_head(net: torch.nn.Module, name: str, head: torch.nn.Module) -> None:
    """Put *head* where the module *name* was (in place)."""
    net.set_submodule(name, head)
    if isinstance(getattr(net, "num_classes", None), int):
        net.num_classes = int(head_spec(head)["num_classes"])


def to_checkpoint(sd: Mapping[str, torch.Tensor], head_module: str) -> dict[str, torch.Tensor]:
    """The net's state dict with the head's keys renamed ``<head_module>.*`` -> ``head_ft.*``."""
    prefix = head_module + "."
    out = {}
    for k, v in sd.items():
        out[HEAD_NAME + "." + k[len(prefix):] if k.startswith(prefix) else k] = v
    return out


def from_checkpoint(sd: Mapping[str, torch.Tensor], head_module: str, what: str) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_checkpoint`; refuses a state dict without the renamed head."""
    prefix = HEAD_NAME + "."
    if not any(k.startswith(prefix) for k in sd):
        raise ModelError(f"{what} has no '{HEAD_NAME}.*' tensors: it is not a deepfeat fine-tuned checkpoint "
                         "(base-model weights are never loaded into a fine-tuned head)")
    if any(k.startswith(head_module + ".") for k in sd):
        raise ModelError(f"{what} holds both '{HEAD_NAME}.*' and '{head_module}.*' tensors; refusing to guess "
                         "which is the head")
    return {(head_module + "." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
