"""The forward passes of a fine-tuning run that train nothing: describing images (eval mode,
captured layers, pooled on the fly), validation (loss, accuracy, retrieval mAP), the
head stage's precomputed features, the off-the-shelf "before" descriptors; and the
cache of the frozen prefix (:mod:`deepfeat.finetune.prefix`) they run through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from deepfeat.finetune import data as D
from deepfeat.finetune import retrieval as R
from deepfeat.finetune.losses import ce_loss


class PassesMixin:
    """:class:`~deepfeat.finetune.train.Finetuner`'s forward passes."""

    def _train_key(self, s: D.Sample):
        """Prefix-cache key of a training sample, None when its pixels change per epoch."""
        if self.cfg.augment == "none" or (self.cfg.augment == "fill" and s.copy == 0):
            return ("train", s.index)
        return None

    @staticmethod
    def _val_key(s: D.Sample):
        return ("val", s.index)

    def _prefix_ok(self, layers: list[str]) -> bool:
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

    def _autocast(self):
        if self.use_amp:
            return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        import contextlib

        return contextlib.nullcontext()

    def _describe(self, loader: D.BatchLoader, samples: list[D.Sample], layers: list[str], epoch: int = 1,
                  augment: str = "none", net: torch.nn.Module | None = None,
                  pooled: dict[str, Any] | None = None, key: Callable | None = None,
                  fill_prefix: Callable | None = None) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Forward *samples* (eval mode, no grad) and capture *layers*; spatial maps of
        layers in *pooled* are pooled on the fly; *augment* is the augmentation mode of
        the views (``none``: the images as they are). With *key* (sample -> prefix-cache
        key) the pass runs from cached prefix outputs where it can; with *fill_prefix*
        (same) the prefix output is captured on the way and cached. Returns the stacked
        captures and the positions of the samples that decoded."""
        from deepfeat.models.taps import Taps

        net = net or self.net
        net.eval()
        use_prefix = key is not None and net is self.net and self._prefix_ok(layers)
        fill = fill_prefix is not None and not use_prefix and net is self.net and self.prefix is not None
        tap_layers = layers + ([self.prefix.last] if fill and self.prefix.last not in layers else [])
        taps = Taps(net, tap_layers, getattr(self.base, "layer_aliases", None))
        outs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        kept: list[int] = []
        bs = max(self.cfg.batch_size, 32)
        self.progress.start(len(samples), "describing images")
        for x, _, pos in loader.batches(samples, bs, aug=self.aug, mode=augment, seed=self.cfg.seed, epoch=epoch):
            self.progress.update(n=len(pos))
            if not len(pos):
                continue
            with torch.inference_mode(), self._autocast():
                keys = [key(samples[i]) for i in pos] if use_prefix else None
                acts = self.forward_from(x, keys, taps)
            if fill:
                for j, i in enumerate(pos):
                    k = fill_prefix(samples[i])
                    if k is not None:
                        self.prefix.put(k, acts[self.prefix.last][j].float())
            for n in layers:
                a = acts[n]
                if pooled and n in pooled:
                    a = pooled[n](a.float())
                outs[n].append(a.float().cpu())
            kept.extend(pos)
        self.progress.close()
        return {n: (torch.cat(v) if v else torch.zeros(0)) for n, v in outs.items()}, kept

    def _val_pass(self, need_desc: bool, pool: str | None = None) -> dict[str, Any]:
        """Loss, accuracy (and retrieval mAP of the eval layer, pooled with *pool* or
        ``--eval-pool``; the pooled descriptors and their val positions as ``_desc``) on
        the validation split."""
        from deepfeat.models.taps import OUTPUT
        from deepfeat.pooling import get_pooling

        if not self.val_samples:
            return {}
        layers = [OUTPUT] + ([self.eval_layer] if need_desc else [])
        pooled = {self.eval_layer: get_pooling(pool or self.eval_pool).to(self.device)} if need_desc else None
        acts, kept = self._describe(self.val_loader, self.val_samples, layers, pooled=pooled, key=self._val_key)
        if not kept:
            return {}
        y = torch.tensor([self.val_samples[i].label for i in kept])
        out = acts[OUTPUT]
        res = {"val_loss": float(ce_loss(out, y, self.probs)), "val_acc": float((out.flatten(1).argmax(1) == y)
                                                                             .float().mean())}
        if need_desc:
            desc = acts[self.eval_layer].numpy()
            ev = self._eval_retrieval(desc, kept)
            res.update(val_map=ev[0].map, val_mp10=ev[0].mp_at_k[10], _eval=ev, _desc=(desc, kept))
        return res

    def _eval_retrieval(self, desc: np.ndarray, kept: list[int]) -> tuple[Any, dict[str, float]]:
        """(EvalResult, mAP per class) of validation descriptors (rows = *kept* val positions)."""
        labels = [self.val[i].label for i in kept]
        paths = [self.val[i].path for i in kept]
        ev = R.evaluate_descriptors(desc, labels, paths, self.classes)
        return ev, R.per_class_map(ev, labels, self.classes)

    def _precompute(self, need_before: bool) -> dict[str, torch.Tensor]:
        """The head's input for every sample (first-epoch views) and validation image."""
        from deepfeat.pooling import get_pooling

        head_in = f"{self.head_module}:in"
        # originals as they are, fill-up copies as the first epoch sees them
        mode = "none" if self.cfg.augment == "none" else "fill"
        acts, kept = self._describe(self.loader, self.samples, [head_in], epoch=1, augment=mode,
                                    key=self._train_key, fill_prefix=self._train_key)
        x = acts[head_in]
        y = torch.tensor([self.samples[i].label for i in kept], dtype=torch.long)
        vx = torch.zeros(0)
        vy = torch.zeros(0, dtype=torch.long)
        if self.val_samples:
            layers = [head_in] + ([self.eval_layer] if need_before else [])
            pool = {self.eval_layer: get_pooling(self.eval_pool).to(self.device)} if need_before else None
            vacts, vkept = self._describe(self.val_loader, self.val_samples, layers, pooled=pool,
                                          key=self._val_key, fill_prefix=self._val_key)
            vx = vacts[head_in]
            vy = torch.tensor([self.val_samples[i].label for i in vkept], dtype=torch.long)
            if need_before:
                self._set_before(self._eval_retrieval(vacts[self.eval_layer].numpy(), vkept))
        # pos_of: sample position -> its row in x, or -1 if the image did not decode
        pos_of = np.full(len(self.samples), -1, dtype=np.int64)
        pos_of[np.asarray(kept, dtype=np.int64)] = np.arange(len(kept))
        return {"x": x, "y": y, "pos_of": pos_of, "vx": vx, "vy": vy}

    def _val_features(self, feats: dict[str, torch.Tensor]) -> dict[str, Any]:
        if not len(feats["vx"]):
            return {}
        self.head.eval()
        with torch.inference_mode():
            out = self.head(feats["vx"].to(self.device)).float().cpu()
        y = feats["vy"]
        return {"val_loss": float(ce_loss(out, y, self.probs)), "val_acc": float((out.argmax(1) == y).float().mean())}

    def _before_eval(self) -> None:
        """Off-the-shelf descriptors of the validation images from a freshly loaded base model."""
        from deepfeat.models import load_model
        from deepfeat.pooling import get_pooling

        base = load_model(self.cfg.model, device=str(self.device))
        pool = {self.eval_layer: get_pooling(self.eval_pool).to(self.device)}
        acts, kept = self._describe(self.val_loader, self.val_samples, [self.eval_layer], net=base.net, pooled=pool)
        self._set_before(self._eval_retrieval(acts[self.eval_layer].numpy(), kept))
        del base

    def _set_before(self, ev: tuple[Any, dict[str, float]]) -> None:
        self.retrieval["before"] = R.summary(ev[0])
        self.retrieval["before_per_class"] = ev[1]
        self._write_retrieval()
