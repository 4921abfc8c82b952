"""The forward passes of a fine-tuning run that train nothing: describing images (eval mode,
captured layers, pooled on the fly), validation (loss, accuracy, retrieval mAP), the head
stage's precomputed features and the off-the-shelf "before" descriptors, through the
cache of the frozen prefix where they can."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepfeat.evaluate import EvalResult
from deepfeat.finetune import data as D
from deepfeat.finetune import retrieval as R
from deepfeat.finetune.config import FinetuneConfig
from deepfeat.finetune.losses import ce_loss
from deepfeat.finetune.network import TrainedNetwork
from deepfeat.finetune.prepared import Loaders, PreparedData
from deepfeat.finetune.progress import TrainingProgress

#: a retrieval measurement on the validation split: the result and the mAP per class
Retrieval = tuple[EvalResult, dict[str, float]]


@dataclass
class Validation:
    """One validation pass: loss and accuracy, and when descriptors were measured their
    mAP and mP@10, the full :data:`Retrieval` and the descriptors with their val positions."""

    val_loss: float
    val_acc: float
    val_map: float | None = None
    val_mp10: float | None = None
    retrieval: Retrieval | None = None
    desc: tuple[np.ndarray, list[int]] | None = None

    def numbers(self) -> dict[str, float]:
        """The fields of a log entry this pass measured."""
        out = {"val_loss": self.val_loss, "val_acc": self.val_acc}
        if self.val_map is not None:
            out.update(val_map=self.val_map, val_mp10=self.val_mp10)
        return out


@dataclass
class HeadFeatures:
    """The head's input for every training sample (first-epoch views; ``pos_of``: sample
    position -> its row in ``x``, -1 if the image did not decode) and validation image."""

    x: torch.Tensor
    y: torch.Tensor
    pos_of: np.ndarray
    vx: torch.Tensor
    vy: torch.Tensor


class Passes:
    """Forward passes over the run's data with its network (eval mode, no gradients)."""

    def __init__(self, cfg: FinetuneConfig, network: TrainedNetwork, data: PreparedData, loaders: Loaders,
                 progress: TrainingProgress):
        self.cfg = cfg
        self.network = network
        self.data = data
        self.loaders = loaders
        self.progress = progress

    def train_key(self, s: D.Sample):
        """Prefix-cache key of a training sample, None when its pixels change per epoch."""
        if self.cfg.augment == "none" or (self.cfg.augment == "fill" and s.copy == 0):
            return ("train", s.index)
        return None

    @staticmethod
    def val_key(s: D.Sample):
        return ("val", s.index)

    def describe(self, loader: D.BatchLoader, samples: list[D.Sample], layers: list[str], epoch: int = 1,
                 augment: str = "none", net: torch.nn.Module | None = None,
                 pooled: dict[str, Any] | None = None, key: Callable | None = None,
                 fill_prefix: Callable | None = None) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Forward *samples* (eval mode, no grad) and capture *layers*; spatial maps of
        layers in *pooled* are pooled on the fly; *augment* is the augmentation mode of
        the views (``none``: the images as they are). With *key* (sample -> prefix-cache
        key) the pass runs from cached prefix outputs where it can; with *fill_prefix*
        (same) the prefix output is captured on the way and cached. Returns the stacked
        captures and the positions of the samples that decoded."""
        nw = self.network
        net = net or nw.net
        net.eval()
        prefix = nw.prefix
        use_prefix = key is not None and net is nw.net and nw.prefix_ok(layers)
        fill = fill_prefix is not None and not use_prefix and net is nw.net and prefix is not None
        tap_layers = layers + ([prefix.last] if fill and prefix.last not in layers else [])
        taps = nw.taps(tap_layers, net)
        outs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        kept: list[int] = []
        bs = max(self.cfg.batch_size, 32)
        self.progress.start(len(samples), "describing images")
        for x, _, pos in loader.batches(samples, bs, aug=self.data.aug, mode=augment, seed=self.cfg.seed,
                                        epoch=epoch):
            self.progress.update(n=len(pos))
            if not len(pos):
                continue
            with torch.inference_mode(), nw.autocast():
                keys = [key(samples[i]) for i in pos] if use_prefix else None
                acts = nw.forward_from(x, keys, taps)
            if fill:
                for j, i in enumerate(pos):
                    k = fill_prefix(samples[i])
                    if k is not None:
                        prefix.put(k, acts[prefix.last][j].float())
            for n in layers:
                a = acts[n]
                if pooled and n in pooled:
                    a = pooled[n](a.float())
                outs[n].append(a.float().cpu())
            kept.extend(pos)
        self.progress.close()
        return {n: (torch.cat(v) if v else torch.zeros(0)) for n, v in outs.items()}, kept

    def _pooled(self, pool: str) -> dict[str, Any]:
        from deepfeat.pooling import get_pooling

        return {self.network.eval_layer: get_pooling(pool).to(self.network.device)}

    def validate(self, need_desc: bool, pool: str | None = None) -> Validation | None:
        """Loss, accuracy (and retrieval mAP of the eval layer, pooled with *pool* or
        ``--eval-pool``) on the validation split; None without validation images."""
        from deepfeat.models.taps import OUTPUT

        nw = self.network
        if not self.data.val_samples:
            return None
        layers = [OUTPUT] + ([nw.eval_layer] if need_desc else [])
        pooled = self._pooled(pool or nw.eval_pool) if need_desc else None
        acts, kept = self.describe(self.loaders.val, self.data.val_samples, layers, pooled=pooled,
                                   key=self.val_key)
        if not kept:
            return None
        y = torch.tensor([self.data.val_samples[i].label for i in kept])
        out = acts[OUTPUT]
        v = Validation(val_loss=float(ce_loss(out, y, nw.probs)),
                       val_acc=float((out.flatten(1).argmax(1) == y).float().mean()))
        if need_desc:
            desc = acts[nw.eval_layer].numpy()
            ev = self.evaluate(desc, kept)
            v.val_map, v.val_mp10, v.retrieval, v.desc = ev[0].map, ev[0].mp_at_k[10], ev, (desc, kept)
        return v

    def evaluate(self, desc: np.ndarray, kept: list[int]) -> Retrieval:
        """The retrieval of validation descriptors (rows = *kept* val positions)."""
        val = self.data.val
        labels = [val[i].label for i in kept]
        ev = R.evaluate_descriptors(desc, labels, [val[i].path for i in kept], self.data.classes)
        return ev, R.per_class_map(ev, labels, self.data.classes)

    def precompute(self, need_before: bool) -> tuple[HeadFeatures, Retrieval | None]:
        """The head's input for every sample (first-epoch views) and validation image; with
        *need_before* also the retrieval of the eval layer (the base model's, as the
        backbone has not trained yet)."""
        nw, data = self.network, self.data
        head_in = f"{nw.head_module}:in"
        # originals as they are, fill-up copies as the first epoch sees them
        mode = "none" if self.cfg.augment == "none" else "fill"
        acts, kept = self.describe(self.loaders.train, data.samples, [head_in], epoch=1, augment=mode,
                                   key=self.train_key, fill_prefix=self.train_key)
        x = acts[head_in]
        y = torch.tensor([data.samples[i].label for i in kept], dtype=torch.long)
        vx = torch.zeros(0)
        vy = torch.zeros(0, dtype=torch.long)
        before = None
        if data.val_samples:
            layers = [head_in] + ([nw.eval_layer] if need_before else [])
            pool = self._pooled(nw.eval_pool) if need_before else None
            vacts, vkept = self.describe(self.loaders.val, data.val_samples, layers, pooled=pool,
                                         key=self.val_key, fill_prefix=self.val_key)
            vx = vacts[head_in]
            vy = torch.tensor([data.val_samples[i].label for i in vkept], dtype=torch.long)
            if need_before:
                before = self.evaluate(vacts[nw.eval_layer].numpy(), vkept)
        pos_of = np.full(len(data.samples), -1, dtype=np.int64)
        pos_of[np.asarray(kept, dtype=np.int64)] = np.arange(len(kept))
        return HeadFeatures(x=x, y=y, pos_of=pos_of, vx=vx, vy=vy), before

    def head_validation(self, feats: HeadFeatures) -> Validation | None:
        """Validation loss and accuracy of the head alone on precomputed features."""
        if not len(feats.vx):
            return None
        nw = self.network
        nw.head.eval()
        with torch.inference_mode():
            out = nw.head(feats.vx.to(nw.device)).float().cpu()
        return Validation(val_loss=float(ce_loss(out, feats.vy, nw.probs)),
                          val_acc=float((out.argmax(1) == feats.vy).float().mean()))

    def before(self) -> Retrieval:
        """Off-the-shelf descriptors of the validation images from a freshly loaded base model."""
        from deepfeat.models import load_model

        nw = self.network
        base = load_model(self.cfg.model, device=str(nw.device))
        acts, kept = self.describe(self.loaders.val, self.data.val_samples, [nw.eval_layer], net=base.net,
                                   pooled=self._pooled(nw.eval_pool))
        return self.evaluate(acts[nw.eval_layer].numpy(), kept)
