"""Setting up a fine-tuning run: the data (check, split, balance, loaders) and the network
(base model, new head, trainable units, the frozen-prefix cache, mixed precision)."""

from __future__ import annotations

import json
import logging
import os

import torch

from deepfeat.errors import UsageError
from deepfeat.finetune import data as D
from deepfeat.finetune import heads as H
from deepfeat.finetune import retrieval as R
from deepfeat.finetune.config import DESCRIPTOR_POOL, METRIC_LOSSES

log = logging.getLogger(__name__)


class PrepareMixin:
    """:class:`~deepfeat.finetune.train.Finetuner`'s data and network."""

    def _prepare_data(self) -> None:
        cfg = self.cfg
        run = self.run
        have_split = all((run / f).is_file() for f in ("classes.txt", "train.txt", "val.txt", "check.json"))
        if cfg.resume and have_split:
            check = json.loads((run / "check.json").read_text(encoding="utf-8"))
            self.root = check["root"]
            self.classes = [c for c in (run / "classes.txt").read_text(encoding="utf-8").splitlines() if c]
            self.train = D.read_split(run / "train.txt", self.root, len(self.classes))
            self.val = D.read_split(run / "val.txt", self.root, len(self.classes))
            self.excluded, self.odd = check["excluded"], check["odd"]
        else:
            ds = D.check_labelled(cfg.data, exclude_odd=cfg.exclude_odd, workers=max(2, self._workers()))
            self.root, self.classes = ds.root, ds.classes
            self.train, self.val = D.split_labelled(ds, cfg.val_frac, cfg.seed)
            self.excluded = [e.to_dict() for e in ds.excluded]
            self.odd = [e.to_dict() for e in ds.odd]
            from deepfeat.store import atomic_write_bytes

            atomic_write_bytes(run / "classes.txt", ("\n".join(self.classes) + "\n").encode("utf-8"))
            D.write_split(run / "train.txt", self.train, self.root)
            D.write_split(run / "val.txt", self.val, self.root)
            R.write_json(run / "check.json", {"root": self.root, "source": str(cfg.data),
                                              "excluded": self.excluded, "odd": self.odd,
                                              "counts": dict(zip(self.classes, ds.counts()))})
        if not self.train:
            raise UsageError("no training images left after the split")
        self.samples = D.balance(self.train, len(self.classes), cfg.per_class)
        self.val_samples = [D.Sample(i, it.label, 0) for i, it in enumerate(self.val)]
        self.aug = D.Augmentation() if cfg.augment != "none" else None

    def _workers(self) -> int:
        return self.cfg.workers or min(4, max(1, os.cpu_count() or 1))

    def _prepare_model(self) -> None:
        from deepfeat.data.normalize import Normalize
        from deepfeat.models import load_model
        from deepfeat.models.base import resolve_device
        from deepfeat.pipeline import default_layer

        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        base = load_model(cfg.model, device="cpu")
        self.base = base
        dc = base.data_config
        if cfg.image_size:
            if dc.fixed_input_size and tuple(dc.input_size) != (cfg.image_size, cfg.image_size):
                raise UsageError(f"model {cfg.model} needs a fixed input size {dc.input_size}; drop --image-size")
            dc = dc.with_overrides(input_size=(int(cfg.image_size), int(cfg.image_size)))
        self.data_config = dc
        self.head_module = H.head_module_name(base)
        self.net = base.net
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(int(cfg.seed))
        old = self.net.get_submodule(self.head_module)
        kind = cfg.head if cfg.head != "auto" else ("cosine" if isinstance(old, torch.nn.Linear) else "linear")
        H.replace_head(self.net, self.head_module, H.new_head(old, len(self.classes), gen, kind, cfg.head_scale))
        self.head = self.net.get_submodule(self.head_module)
        self.probs = base.output_kind == "probs"
        self.units = H.backbone_units(self.net, self.head_module)
        self.train_units = H.resolve_train_blocks(self.units, cfg.train_blocks)
        self.eval_layer = default_layer(base) if cfg.eval_layer in ("default", "") else cfg.eval_layer
        self.eval_pool = cfg.eval_pool if cfg.eval_pool not in ("default", "") else \
            ("gem" if cfg.loss in METRIC_LOSSES else DESCRIPTOR_POOL)
        self.net.to(self.device)
        self.normalize = Normalize(dc).to(self.device)
        self.head_is_last = self._check_head_is_last()
        self.use_amp = cfg.amp == "on" or (cfg.amp == "auto" and self.device.type == "cuda")
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and self.device.type == "cuda" else None
        n_img = len(self.train) + len(self.val)
        cache = cfg.cache_images == "on" or (cfg.cache_images == "auto" and D.cache_fits(n_img, dc))
        self.loader = D.BatchLoader(self.train, dc, workers=self._workers(), cache=cache)
        self.val_loader = D.BatchLoader(self.val, dc, workers=self._workers(), cache=cache)
        self.prefix = self._make_prefix()

    def _make_prefix(self):
        """A verified :class:`FrozenPrefix` before the first trained unit, or None."""
        from deepfeat.finetune.prefix import FrozenPrefix

        if self.cfg.cache_prefix == "off" or not self.cfg.epochs or not self.train_units or \
                self.train_units[0] == self.units[0]:
            return None
        try:
            prefix = FrozenPrefix(self.net, self.train_units[0])
        except ValueError:
            return None
        h, w = self.data_config.input_size
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, self.data_config.channels, h, w, generator=gen).to(self.device)
        if not prefix.verify(x):
            log.info("the network does not run %s as a plain sequence; the full stage runs whole forward passes",
                     ", ".join(prefix.names))
            return None
        return prefix

    def _check_head_is_last(self) -> bool:
        """True when the network output is the head's output (so the head can be trained
        on precomputed features)."""
        seen = {}

        def hook(_m, _a, out):
            seen["out"] = out

        h, w = self.data_config.input_size
        x = torch.zeros(1, self.data_config.channels, h, w, device=self.device)
        handle = self.head.register_forward_hook(hook)
        try:
            self.net.eval()
            with torch.inference_mode():
                out = self.net(x)
        finally:
            handle.remove()
        return isinstance(out, torch.Tensor) and out is seen.get("out")

    def _log_plan(self) -> None:
        cfg = self.cfg
        counts = D.balance_counts(self.samples, len(self.classes))
        self.progress.line(
            f"{len(self.classes)} classes, {len(self.train)} train / {len(self.val)} val images "
            f"({len(self.excluded)} excluded), {len(self.samples)} samples per epoch after balancing "
            f"(min {min(counts)}, max {max(counts)} per class); model {cfg.model} at "
            f"{self.data_config.input_size[0]}x{self.data_config.input_size[1]} on {self.device}; "
            f"head {self.head_module} -> {len(self.classes)} outputs; full stage trains "
            f"{', '.join(self.train_units) if self.train_units else 'the head only'}"
            + (f" (frozen {self.prefix.names[0]}..{self.prefix.last} run once per un-augmented image and cached)"
               if self.prefix else ""))
