"""The network a fine-tuning run trains: the base model with its new head, which units train,
the descriptor it is measured by, the frozen-prefix cache (:mod:`deepfeat.finetune.prefix`),
the device and mixed precision, and how it runs (training mode, forward passes)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepfeat.data.preprocess import DataConfig
from deepfeat.errors import UsageError
from deepfeat.finetune import heads as H
from deepfeat.finetune.config import DESCRIPTOR_POOL, METRIC_LOSSES, FinetuneConfig
from deepfeat.finetune.prefix import FrozenPrefix

log = logging.getLogger(__name__)


@dataclass
class TrainedNetwork:
    """``net`` (the base model's network, its classifier ``head_module`` replaced by
    ``head``) on ``device``; ``units`` its backbone units, ``train_units`` those the full
    stage trains; ``eval_layer``/``eval_pool`` the run's descriptor; ``prefix`` the frozen
    layers before the first trained unit, run once per image and cached (or None);
    ``head_is_last`` whether the network's output is the head's (so the head stage can
    train on precomputed features). Make one with :meth:`build`."""

    base: Any  # the deepfeat Model the network came from
    net: torch.nn.Module
    head_module: str
    head: torch.nn.Module
    data_config: DataConfig
    device: torch.device
    probs: bool
    units: list[str]
    train_units: list[str]
    eval_layer: str
    eval_pool: str
    normalize: torch.nn.Module
    head_is_last: bool
    use_amp: bool
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler | None
    prefix: FrozenPrefix | None

    @classmethod
    def build(cls, cfg: FinetuneConfig, n_classes: int) -> TrainedNetwork:
        """Load ``cfg.model``, put a new head of *n_classes* outputs in place of its classifier
        (seeded by ``cfg.seed``) and set up how it trains."""
        from deepfeat.data.normalize import Normalize
        from deepfeat.models import load_model
        from deepfeat.models.base import resolve_device
        from deepfeat.pipeline import default_layer

        device = resolve_device(cfg.device)
        base = load_model(cfg.model, device="cpu")
        dc = base.data_config
        if cfg.image_size:
            if dc.fixed_input_size and tuple(dc.input_size) != (cfg.image_size, cfg.image_size):
                raise UsageError(f"model {cfg.model} needs a fixed input size {dc.input_size}; drop --image-size")
            dc = dc.with_overrides(input_size=(int(cfg.image_size), int(cfg.image_size)))
        head_module = H.head_module_name(base)
        net = base.net
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(int(cfg.seed))
        old = net.get_submodule(head_module)
        kind = cfg.head if cfg.head != "auto" else ("cosine" if isinstance(old, torch.nn.Linear) else "linear")
        H.replace_head(net, head_module, H.new_head(old, n_classes, gen, kind, cfg.head_scale))
        head = net.get_submodule(head_module)
        units = H.backbone_units(net, head_module)
        train_units = H.resolve_train_blocks(units, cfg.train_blocks)
        eval_layer = default_layer(base) if cfg.eval_layer in ("default", "") else cfg.eval_layer
        eval_pool = cfg.eval_pool if cfg.eval_pool not in ("default", "") else \
            ("gem" if cfg.loss in METRIC_LOSSES else DESCRIPTOR_POOL)
        net.to(device)
        use_amp = cfg.amp == "on" or (cfg.amp == "auto" and device.type == "cuda")
        return cls(
            base=base, net=net, head_module=head_module, head=head, data_config=dc, device=device,
            probs=base.output_kind == "probs", units=units, train_units=train_units, eval_layer=eval_layer,
            eval_pool=eval_pool, normalize=Normalize(dc).to(device),
            head_is_last=_head_is_last(net, head, dc, device), use_amp=use_amp,
            amp_dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
            scaler=torch.amp.GradScaler("cuda") if use_amp and device.type == "cuda" else None,
            prefix=_make_prefix(cfg, net, units, train_units, dc, device),
        )

    # ----------------------------------------------------------------- running

    def train_mode(self, bn: str) -> None:
        """Training mode for the head and the trained units; frozen units in eval mode
        (their BatchNorm statistics and dropout as at inference); BatchNorm per ``--bn``."""
        self.net.train()
        live = set(self.train_units)
        for name in self.units:
            if name not in live:
                self.net.get_submodule(name).eval()
        H.set_bn_mode(self.net, bn, self.train_units)

    def autocast(self):
        if self.use_amp:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def prefix_ok(self, layers: list[str]) -> bool:
        """Whether captures of *layers* survive running from the cached prefix output."""
        if self.prefix is None:
            return False
        for layer in layers:
            base = layer.split(":")[0]
            if any(base == n or base.startswith(n + ".") for n in self.prefix.names):
                return False
        return True

    def forward_from(self, x: np.ndarray, keys: list | None, fn: Callable[[torch.Tensor], Any]) -> Any:
        """``fn(net input)`` for a uint8 batch *x*, through the prefix cache when *keys*
        are given (one per row, None = not cacheable) and a prefix is in use."""
        xt = torch.from_numpy(x)
        if keys is None or self.prefix is None:
            return fn(self.normalize(xt.to(self.device)))
        z = self.prefix.batch(keys, lambda rows: self.normalize(xt[rows].to(self.device)), self.device)
        with self.prefix.injected(z) as dummy:
            return fn(dummy)

    def taps(self, layers: list[str], net: torch.nn.Module | None = None):
        from deepfeat.models.taps import Taps

        return Taps(net or self.net, layers, getattr(self.base, "layer_aliases", None))

    def checkpoint(self) -> dict[str, torch.Tensor]:
        """The network's tensors on the CPU, the head's as ``head_ft.*``."""
        return H.to_checkpoint({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, self.head_module)

    def load_checkpoint(self, sd: dict[str, torch.Tensor], what: str) -> None:
        from deepfeat.models.weights import fit_state_dict

        fit_state_dict(self.net, H.from_checkpoint(sd, self.head_module, what), what)

    def pool_spec(self) -> str:
        """The canonical spec of ``eval_pool``."""
        from deepfeat.pooling import get_pooling

        return get_pooling(self.eval_pool).spec

    def plan(self, cfg: FinetuneConfig, n_classes: int) -> str:
        """The network part of the run's opening line."""
        h, w = self.data_config.input_size
        return (f"model {cfg.model} at {h}x{w} on {self.device}; head {self.head_module} -> {n_classes} outputs; "
                f"full stage trains {', '.join(self.train_units) if self.train_units else 'the head only'}"
                + (f" (frozen {self.prefix.names[0]}..{self.prefix.last} run once per un-augmented image and "
                   "cached)" if self.prefix else ""))


def _make_prefix(cfg: FinetuneConfig, net: torch.nn.Module, units: list[str], train_units: list[str],
                 dc: DataConfig, device: torch.device) -> FrozenPrefix | None:
    """A verified :class:`FrozenPrefix` before the first trained unit, or None."""
    if cfg.cache_prefix == "off" or not cfg.epochs or not train_units or train_units[0] == units[0]:
        return None
    try:
        prefix = FrozenPrefix(net, train_units[0])
    except ValueError:
        return None
    h, w = dc.input_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, dc.channels, h, w, generator=gen).to(device)
    if not prefix.verify(x):
        log.info("the network does not run %s as a plain sequence; the full stage runs whole forward passes",
                 ", ".join(prefix.names))
        return None
    return prefix


def _head_is_last(net: torch.nn.Module, head: torch.nn.Module, dc: DataConfig, device: torch.device) -> bool:
    """True when the network output is the head's output (so the head can be trained on
    precomputed features)."""
    seen = {}

    def hook(_m, _a, out):
        seen["out"] = out

    h, w = dc.input_size
    x = torch.zeros(1, dc.channels, h, w, device=device)
    handle = head.register_forward_hook(hook)
    try:
        net.eval()
        with torch.inference_mode():
            out = net(x)
    finally:
        handle.remove()
    return isinstance(out, torch.Tensor) and out is seen.get("out")
