"""Network surgery for fine-tuning: a new head, trainable units, parameter groups, BatchNorm.

The model's classifier module is replaced in place by a new layer with one output per
user class (``bn2`` is still ``bn2`` for taps, extraction and sweeps); what loading a
fine-tuned network needs of its head (the head modules, their spec, the ``head_ft.*``
checkpoint names) lives in :mod:`deepfeat.models.heads` and is used from here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from deepfeat.errors import ModelError, UsageError
from deepfeat.models.heads import (
    HEAD_NAME,
    CosineHead,
    build_head,
    from_checkpoint,
    head_spec,
    replace_head,
    to_checkpoint,
)

__all__ = [
    "BN_MODES", "HEAD_KINDS", "HEAD_NAME", "CosineHead", "backbone_units", "build_head", "from_checkpoint",
    "head_module_name", "head_spec", "new_head", "param_groups", "replace_head", "resolve_train_blocks",
    "set_bn_mode", "set_trainable", "to_checkpoint",
]

_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList)


def head_module_name(model) -> str:
    """The module name of the model's classifier, or a clear error."""
    name = getattr(model, "classifier", None)
    if getattr(model, "tapper", None) is not None:
        raise ModelError(f"model {model.spec} runs in ONNX Runtime and cannot be trained; fine-tune the PyTorch, "
                         "timm, torchvision or Caffe model it was exported from")
    if not name:
        raise ModelError(f"model {model.spec} has no known classifier layer, so it cannot get a new head; "
                         "fine-tuning needs a classification model (timm, torchvision, embedded, Caffe with an "
                         "InnerProduct classifier)")
    try:
        model.net.get_submodule(name)
    except AttributeError:
        raise ModelError(f"model {model.spec}: classifier {name!r} is not a module of the network") from None
    return name


HEAD_KINDS = ("linear", "cosine")


def new_head(old: torch.nn.Module, num_classes: int, generator: torch.Generator | None = None,
             kind: str = "linear", scale: float = 16.0) -> torch.nn.Module:
    """A freshly initialised layer shaped like *old* but with *num_classes* outputs.

    ``linear``: weights ~ N(0, 0.01), bias 0 (the Gaussian filler of Caffe's fine-tuning
    recipes). ``cosine``: a :class:`CosineHead` (for Linear classifiers), weights ~ N(0, 0.01).
    """
    if num_classes < 2:
        raise UsageError(f"a classifier needs at least 2 classes, not {num_classes}")
    if kind not in HEAD_KINDS:
        raise UsageError(f"--head {kind!r} unknown; choose {', '.join(HEAD_KINDS)}")
    if kind == "cosine":
        n_in = getattr(old, "in_features", None)
        if not isinstance(n_in, int):
            raise ModelError(f"--head cosine replaces a Linear classifier, not a {type(old).__name__}; use --head "
                             "linear")
        head_c = CosineHead(n_in, num_classes, scale)
        with torch.no_grad():
            head_c.weight.normal_(0.0, 0.01, generator=generator)
        return head_c.to(next(old.parameters(), torch.empty(0)).device)
    if isinstance(old, torch.nn.Linear):
        head: torch.nn.Module = torch.nn.Linear(old.in_features, num_classes, bias=True)
    elif isinstance(old, torch.nn.Conv2d) and old.kernel_size == (1, 1):
        head = torch.nn.Conv2d(old.in_channels, num_classes, 1, bias=True)
    else:
        w = getattr(old, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(old, "in_features"):
            head = torch.nn.Linear(int(old.in_features), num_classes, bias=True)
        else:
            raise ModelError(f"cannot replace a classifier of type {type(old).__name__}; fine-tuning supports "
                             "Linear and 1x1 Conv2d classifiers")
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    return head.to(next(old.parameters(), torch.empty(0)).device)


# ---------------------------------------------------------------------------
# Trainable units
# ---------------------------------------------------------------------------


def backbone_units(net: torch.nn.Module, head_module: str) -> list[str]:
    """The backbone's units in registration (forward) order: top-level children with
    parameters, with ``Sequential``/``ModuleList`` children expanded one level
    (``blocks.0`` ... ``blocks.6``; ``layer1`` ... ``layer4``; ``features.0`` ...).
    The head and the modules holding only the head are left out."""
    out = []
    for name, child in net.named_children():
        if isinstance(child, _CONTAINERS) and len(child) > 0:
            subs = [(f"{name}.{n}", m) for n, m in child.named_children()]
        else:
            subs = [(name, child)]
        for sub, m in subs:
            if sub == head_module or not any(True for _ in m.parameters()):
                continue
            if head_module.startswith(sub + "."):
                # a container holding the head (VGG's classifier): its other parameterised children are units
                for n2, m2 in m.named_children():
                    full = f"{sub}.{n2}"
                    if full != head_module and not head_module.startswith(full + ".") and \
                            any(True for _ in m2.parameters()):
                        out.append(full)
                continue
            out.append(sub)
    return out


def resolve_train_blocks(units: list[str], spec: str | int) -> list[str]:
    """Which units train: ``all``, ``0`` (none, head only), ``N`` (the last N units) or a unit
    name (that unit and every later one)."""
    text = str(spec).strip()
    if text.lower() == "all":
        return list(units)
    if text.isdigit():
        n = int(text)
        return units[len(units) - n:] if n else []
    if text in units:
        return units[units.index(text):]
    from deepfeat.errors import suggest

    raise UsageError(f"--train-blocks {text!r}: give 'all', a number of last units, or a unit name; units are: "
                     f"{', '.join(units)}.{suggest(text, units)}")


def set_trainable(net: torch.nn.Module, head_module: str, units: Iterable[str]) -> list[torch.nn.Parameter]:
    """Make the head and *units* trainable, freeze everything else; return trainable params."""
    for p in net.parameters():
        p.requires_grad_(False)
    names = [head_module, *units]
    params = []
    for n in names:
        for p in net.get_submodule(n).parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def param_groups(net: torch.nn.Module, head_module: str, lr: float, weight_decay: float, head_lr_mult: float,
                 head_bias_lr_mult: float) -> list[dict]:
    """SGD groups over the trainable parameters: backbone weights (lr, weight decay),
    backbone 1-d parameters (BN scales/shifts and biases: lr, no decay), head weight
    (lr x head_lr_mult, decay) and head bias (lr x head_bias_lr_mult, no decay), the
    Caffe ``lr_mult: 10 / 20`` and ``decay_mult: 1 / 0`` convention. ``lr_mult`` is
    kept in each group so schedules scale every group alike."""
    head_prefix = head_module + "."
    groups = {"backbone": [], "backbone_no_decay": [], "head_weight": [], "head_bias": []}
    for n, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if n.startswith(head_prefix):
            groups["head_bias" if p.dim() == 1 else "head_weight"].append(p)
        else:
            groups["backbone_no_decay" if p.dim() <= 1 else "backbone"].append(p)
    spec = {
        "backbone": (1.0, weight_decay),
        "backbone_no_decay": (1.0, 0.0),
        "head_weight": (head_lr_mult, weight_decay),
        "head_bias": (head_bias_lr_mult, 0.0),
    }
    out = []
    for name, params in groups.items():
        if params:
            mult, wd = spec[name]
            out.append({"name": name, "params": params, "lr": lr * mult, "lr_mult": mult, "weight_decay": wd})
    return out


BN_MODES = ("frozen", "train")


def set_bn_mode(net: torch.nn.Module, mode: str, trainable_units: Iterable[str] = ()) -> int:
    """After ``net.train()``: put BatchNorm layers in eval mode (frozen running statistics)
    everywhere with ``frozen``; with ``train`` only those outside *trainable_units*.
    Returns the number of BatchNorm layers left in training mode."""
    if mode not in BN_MODES:
        raise UsageError(f"--bn {mode!r} unknown; choose {', '.join(BN_MODES)}")
    live = set()
    if mode == "train":
        for u in trainable_units:
            for m in net.get_submodule(u).modules():
                live.add(id(m))
    n = 0
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            if id(m) in live:
                m.train()
                n += 1
            else:
                m.eval()
    return n
