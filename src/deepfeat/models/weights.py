"""Reading weight files safely and fitting them to an architecture with clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

import torch

from deepfeat.errors import ModelError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "params")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file, never unpickling code.

    Torch files go through ``torch.load(weights_only=True)``; checkpoints that wrap
    the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped, and
    ``module.``/``model.`` prefixes left by DataParallel or Lightning are removed.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file not found: {p}")
    if p.stat().st_size == 0:
        raise ModelError(f"weights file is empty: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: object = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, pickle with code, wrong format...
        raise ModelError(f"cannot read weights {p.name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    for _ in range(3):
        if isinstance(sd, Mapping) and not _looks_like_state_dict(sd):
            inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
            if inner is None:
                break
            sd = inner
    if not isinstance(sd, Mapping) or not _looks_like_state_dict(sd):
        raise ModelError(f"{p.name} does not contain a state dict of tensors")
    out = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k.removeprefix(prefix): v for k, v in out.items()}
    return out


def _looks_like_state_dict(d: Mapping) -> bool:
    return bool(d) and sum(isinstance(v, torch.Tensor) for v in d.values()) >= max(1, len(d) // 2)


def _summarise(names: list[str], n: int = 6) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def fit_state_dict(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Load *sd* into *module* strictly, summarising every mismatch in one message."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or bad_shape:
        parts = [f"weights do not fit {what}:"]
        if bad_shape:
            parts.append(f"{len(bad_shape)} shape mismatch(es) [file vs model]: {_summarise(bad_shape, 4)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_summarise(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_summarise(unexpected)}")
        raise ModelError("\n  ".join(parts))
    module.load_state_dict(sd, strict=False)


def infer_num_classes(skeleton: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor],
                      default: int = 1000) -> int | None:
    """Number of classes of the weights in *sd*, by comparing with an architecture's
    default state dict: the classifier is the tensor whose first dimension is
    *default* in the skeleton and differs only there in the file (Linear or 1x1 conv)."""
    n = None
    for k, v in skeleton.items():
        w = sd.get(k)
        if w is None or v.dim() == 0 or v.shape[0] != default or w.dim() != v.dim():
            continue
        if tuple(w.shape[1:]) == tuple(v.shape[1:]) and w.shape[0] != default:
            n = int(w.shape[0])
    return n


Convert = Callable[[dict[str, torch.Tensor], torch.nn.Module], Mapping[str, torch.Tensor]]


def shapes_only(create: Callable[..., torch.nn.Module]) -> torch.nn.Module:
    """``create()`` on PyTorch's meta device: the parameters' names and shapes without memory or the
    random initialisation (which for a ViT-S is most of building it: 22M values drawn twice, once
    for the shapes and once for the network the weights go into). An architecture whose
    construction computes with values (``.item()``) is built for real."""
    try:
        with torch.device("meta"):
            return create()
    except Exception:  # noqa: BLE001 - any failure on meta tensors: the ordinary way
        return create()


def build_with_weights(create: Callable[..., torch.nn.Module], weights: str | os.PathLike, what: str,
                       drop: tuple[str, ...] = (), convert: Convert | None = None) -> torch.nn.Module:
    """An architecture of a model zoo (``create(**kwargs)`` builds it) with the state dict of the
    file *weights* loaded into it, its classifier sized as the file's (:func:`infer_num_classes`);
    *drop*: prefixes of the file's keys to leave out (heads the architecture is built without);
    *convert(sd, net)*: applied when the file's key names are not the architecture's (an original
    release's layout, e.g. timm's ``checkpoint_filter_fn``), before the strict fit."""
    sd = read_state_dict(weights)
    skeleton = shapes_only(create)
    own = {k for k in skeleton.state_dict() if not k.endswith("num_batches_tracked")}
    if convert is not None and set(sd) != own:
        sd = dict(convert(dict(sd), create()))  # a filter may compute with the network's own tensors
    n = infer_num_classes(skeleton.state_dict(), sd)
    if drop:
        sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    net = create(**({"num_classes": n} if n else {}))
    fit_state_dict(net, sd, what)
    return net
