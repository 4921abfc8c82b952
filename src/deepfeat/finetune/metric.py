"""Metric learning for retrieval: contrastive or triplet loss on tuples with mined hard negatives.

Radenović, Tolias & Chum, *Fine-tuning CNN image retrieval with no human annotation*
(TPAMI 2018), with class labels in place of their 3D-reconstruction clusters: each
epoch the current network describes every training image (tapped layer -> GeM ->
L2); each query gets a positive (another image of its class, drawn at random) and
the ``neg_num`` most similar images of *other* classes as hard negatives, at most one
per class (as they take one per 3D model). The loss of a tuple is

    0.5 * d(q, p)^2 + sum_n 0.5 * max(0, margin - d(q, n))^2

with ``d`` the Euclidean distance of L2-normalised descriptors (margin 0.7 by default).
``--loss triplet`` uses cirtorch's triplet loss on the same tuples instead,

    sum_n max(0, margin + d(q, p)^2 - d(q, n)^2)        (margin 0.1 by default)

which only asks each negative to be further than the positive by the margin. The GeM power p is a
parameter learned end to end (learning rate x10, as in cirtorch). The losses themselves are in
:mod:`deepfeat.finetune.losses`.

With ``--whiten DIM`` a linear whitening after GeM is learned with the network
(:mod:`deepfeat.finetune.whitening`).

After the metric stage the classifier head (trained in the head stage on the old
features) is re-fitted on the new backbone's features, so that the result classifies
as well as it retrieves.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from deepfeat.errors import UsageError
from deepfeat.finetune import data as D
from deepfeat.finetune import heads as H
from deepfeat.finetune.config import FinetuneConfig
from deepfeat.finetune.losses import DEFAULT_MARGIN, ce_loss, contrastive_loss, triplet_loss
from deepfeat.finetune.network import TrainedNetwork
from deepfeat.finetune.passes import Passes
from deepfeat.finetune.progress import TrainingProgress
from deepfeat.finetune.schedule import Schedule
from deepfeat.finetune.state import LogEntry
from deepfeat.finetune.whitening import WHITENING_FILE, l2_rows, pca_whitening, whiten_rows
from deepfeat.pooling import GeM, gem

__all__ = ["MetricLearner", "contrastive_loss", "triplet_loss"]

#: one optimizer step on a loss (:meth:`deepfeat.finetune.trainer.Trainer.step`)
Step = Callable[[torch.optim.Optimizer, torch.Tensor], None]


class MetricLearner:
    """The ``--loss contrastive|triplet`` full stage: the learned GeM (and whitening) over
    *network*'s eval layer, the tuples mined with *passes*, the head re-fit; *run* names the
    run directory in the whitening's meta."""

    def __init__(self, cfg: FinetuneConfig, network: TrainedNetwork, passes: Passes, run: str) -> None:
        self.cfg = cfg
        self.network = network
        self.passes = passes
        self.run = run
        self.layer = network.eval_layer
        self.gem = GeM(p=3.0, learnable=cfg.learn_gem).to(network.device)
        self.loss = cfg.loss
        self.margin = float(cfg.margin if cfg.margin is not None else DEFAULT_MARGIN[cfg.loss])
        self.neg_num = int(cfg.neg_num)
        self.per_step = max(1, cfg.batch_size // (2 + self.neg_num))
        self.refit: dict[str, Any] = {}
        self.whiten_dim = int(cfg.whiten) if cfg.whiten else None
        self.whiten: torch.nn.Linear | None = None  # made at the start of the stage (or from a snapshot)
        self._first_descriptors: tuple | None = None  # the init pass, reused by the first mining
        if self.whiten_dim:
            self._check_whiten_dim()

    # -------------------------------------------------------------- bookkeeping

    @property
    def p(self) -> float:
        return float(self.gem.p.detach().reshape(-1)[0])

    def param_groups(self, base_lr: float) -> list[dict]:
        groups = []
        if isinstance(self.gem.p, torch.nn.Parameter):
            groups.append({"name": "gem_p", "params": [self.gem.p], "lr": base_lr * 10, "lr_mult": 10.0,
                           "weight_decay": 0.0})
        if self.whiten_dim:
            if self.whiten is None:
                self._init_whitening()
            wd = self.cfg.weight_decay
            groups += [{"name": "whiten_weight", "params": [self.whiten.weight], "lr": base_lr, "lr_mult": 1.0,
                        "weight_decay": wd},
                       {"name": "whiten_bias", "params": [self.whiten.bias], "lr": base_lr, "lr_mult": 1.0,
                        "weight_decay": 0.0}]
        return groups

    def state_dict(self) -> dict[str, Any]:
        d = {"gem_p": self.gem.p.detach().cpu().clone()}
        if self.whiten is not None:
            d.update({f"whiten.{k}": v.detach().cpu().clone() for k, v in self.whiten.state_dict().items()})
        return d

    def load_state_dict(self, d: dict[str, Any]) -> None:
        with torch.no_grad():
            self.gem.p.copy_(d["gem_p"].to(self.gem.p.device))
        if self.whiten_dim and "whiten.weight" in d:
            w = d["whiten.weight"]
            if tuple(w.shape)[0] != self.whiten_dim:
                raise UsageError(f"the snapshot's whitening has {w.shape[0]} dims, --whiten asks for "
                                 f"{self.whiten_dim}; resume with --whiten {w.shape[0]}")
            self.whiten = self._linear(int(w.shape[1]))
            self.whiten.load_state_dict({"weight": w, "bias": d["whiten.bias"]})

    def meta(self) -> dict[str, Any]:
        return {"loss": self.loss, "margin": self.margin, "neg_num": self.neg_num, "layer": self.layer,
                "gem_p": round(self.p, 6), "pooling": f"gem:p={self.p:.6g}",
                "whitening": ({"dim": self.whiten_dim, "file": WHITENING_FILE, "post": self.whitening_chain().spec,
                               "init": "pca"} if self.whiten is not None else None),
                "head_refit": self.refit}

    # -------------------------------------------------------------- whitening

    def _check_whiten_dim(self) -> None:
        """--whiten DIM fits the layer's dimension: checked with one tiny forward pass now,
        not after the head stage."""
        nw, net = self.network, self.network.net
        flags = {m: m.training for m in net.modules()}
        net.eval()
        try:
            h, w = nw.data_config.input_size
            x = torch.zeros(1, len(nw.data_config.mean), h, w, device=nw.device)
            with torch.inference_mode():
                out = nw.taps([self.layer])(x)[self.layer]
        finally:
            for m, f in flags.items():
                m.training = f
        self._fits(int(out.shape[1]))

    def _fits(self, dim_in: int) -> None:
        if self.whiten_dim > dim_in:
            raise UsageError(f"--whiten {self.whiten_dim} is more than the {dim_in} dims of layer {self.layer!r}")

    def _linear(self, dim_in: int) -> torch.nn.Linear:
        self._fits(dim_in)
        return torch.nn.Linear(dim_in, self.whiten_dim, bias=True).to(self.network.device)

    def _init_whitening(self) -> None:
        """``W`` = leading principal directions of the training descriptors, ``b = -W mean``."""
        x, labels, index = self._descriptors(whitened=False)
        self._first_descriptors = (x, labels, index)
        W, b = pca_whitening(x, self.whiten_dim)
        self.whiten = self._linear(x.shape[1])
        with torch.no_grad():
            self.whiten.weight.copy_(torch.from_numpy(W).float())
            self.whiten.bias.copy_(torch.from_numpy(b).float())

    def _whiten_np(self, x: np.ndarray) -> np.ndarray:
        W = self.whiten.weight.detach().cpu().double().numpy()
        b = self.whiten.bias.detach().cpu().double().numpy()
        return whiten_rows(x, W, b)

    def whitening_chain(self):
        """The learned whitening as a fitted post-processing chain (``l2,lw:DIM,l2``)."""
        from deepfeat.postprocess import learned_whitening_chain

        return learned_whitening_chain(
            self.whiten.weight.detach().cpu().double().numpy(), self.whiten.bias.detach().cpu().double().numpy(),
            {"layer": self.layer, "pooling": f"gem:p={self.p:.6g}", "model": f"finetuned:{self.run}",
             "trained_on": len(self.passes.data.train), "init": "pca"})

    def save_files(self, run) -> None:
        """Write ``whitening.npz`` into the run directory (when a whitening is learned)."""
        if self.whiten is not None:
            self.whitening_chain().save(run / WHITENING_FILE, extra={"layer": self.layer,
                                                                      "pooling": f"gem:p={self.p:.6g}"})

    def describe_np(self, x: np.ndarray) -> np.ndarray:
        """The final descriptors of pooled (GeM) rows *x*: L2, then the learned whitening and L2."""
        x = l2_rows(x)
        return self._whiten_np(x) if self.whiten is not None else x

    def n_queries(self) -> int:
        n = len(self.passes.data.train)
        return min(self.cfg.tuples or n, n)

    def iters_per_epoch(self) -> int:
        if self.cfg.iters_per_epoch:
            return int(self.cfg.iters_per_epoch)
        return math.ceil(self.n_queries() / self.per_step)

    # -------------------------------------------------------------- training

    def _descriptors(self, whitened: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(descriptors, labels, train indices) of the training originals with the current network."""
        passes = self.passes
        originals = [D.Sample(i, it.label, 0) for i, it in enumerate(passes.data.train)]
        p = self.p
        acts, kept = passes.describe(passes.loaders.train, originals, [self.layer],
                                     pooled={self.layer: lambda a: gem(a, p=p)}, key=passes.train_key,
                                     fill_prefix=passes.train_key)
        x = acts[self.layer].numpy()
        x = l2_rows(x)
        return x, np.array([originals[i].label for i in kept]), np.array(kept)

    def _mine(self, epoch: int) -> list[tuple[int, int, list[int]]]:
        """(query, positive, negatives) as train indices, from the current descriptors."""
        cfg = self.cfg
        if self._first_descriptors is not None:  # computed by the whitening's init, nothing trained since
            x, labels, index = self._first_descriptors
            self._first_descriptors = None
        else:
            x, labels, index = self._descriptors()
        if self.whiten is not None:
            x = self._whiten_np(x)
        kept = index
        rng = np.random.default_rng([int(cfg.seed) & 0xFFFFFFFF, zlib.crc32(b"metric"), int(epoch)])
        n_q = min(self.n_queries(), len(kept))
        out = []
        for qi in rng.choice(len(kept), n_q, replace=False):
            same = np.flatnonzero(labels == labels[qi])
            same = same[same != qi]
            if not len(same):
                continue
            pi = int(rng.choice(same))
            order = np.argsort(-(x @ x[qi]), kind="stable")
            negs, used = [], set()
            for j in order:
                lab = int(labels[j])
                if lab == labels[qi] or lab in used:
                    continue
                negs.append(int(index[j]))
                used.add(lab)
                if len(negs) == self.neg_num:
                    break
            if negs:
                out.append((int(index[qi]), int(index[pi]), negs))
        return out

    def epoch(self, e: int, opt: torch.optim.Optimizer, sched: Schedule, base_lr: float, it: int, step: Step,
              progress: TrainingProgress) -> tuple[LogEntry, int]:
        """One epoch of the metric stage: mine tuples, then train on them. Returns the log
        entry and the iteration after it."""
        cfg, nw, passes = self.cfg, self.network, self.passes
        t0 = time.perf_counter()
        tuples = self._mine(e)
        mine_s = time.perf_counter() - t0
        iters = self.iters_per_epoch()
        taps = nw.taps([self.layer])
        tot_loss, n_tuples, lr = 0.0, 0, base_lr
        progress.start(iters, f"epoch {e} [full, {self.loss}]")
        for b in range(iters):
            chunk = [tuples[(b * self.per_step + k) % len(tuples)] for k in range(self.per_step)] if tuples else []
            lr = sched.apply(opt, it, base_lr)
            it += 1
            samples, sizes = [], []
            for q, pidx, negs in chunk:
                idx = [q, pidx, *negs]
                samples.extend(D.Sample(i, passes.data.train[i].label, 0) for i in idx)
                sizes.append(len(idx))
            x, _, kept = passes.loaders.train._build(samples, passes.data.aug, cfg.augment, cfg.seed, e)
            if len(kept) != len(samples):  # an image failed to decode: skip this step
                continue
            nw.train_mode(cfg.bn)
            keys = [passes.train_key(s) for s in samples] if nw.prefix_ok([self.layer]) else None
            with nw.autocast():
                fmap = nw.forward_from(x, keys, taps)[self.layer]
            loss = self._loss(fmap, sizes)
            step(opt, loss)
            with torch.no_grad():
                self.gem.p.clamp_(min=1.0)  # p < 1 is not a generalised *max*; cirtorch keeps p >= 1 in practice
            tot_loss += loss.item() * len(sizes)
            n_tuples += len(sizes)
            progress.update(loss.item())
        progress.close()
        entry = LogEntry(epoch=e, stage="full", iters=iters, images=int(n_tuples * (2 + self.neg_num)),
                         train_loss=tot_loss / max(n_tuples, 1), train_acc=None, lr=lr, gem_p=self.p,
                         mine_seconds=round(mine_s, 2))
        return entry, it

    def _loss(self, fmap: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """The mean loss of the tuples whose feature maps are *fmap*, *sizes* rows each."""
        d = self.gem(fmap.float())
        d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if self.whiten is not None:
            d = self.whiten(d)
            d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        loss = d.new_zeros(())
        start = 0
        for n in sizes:
            t = d[start:start + n]
            if self.loss == "triplet":
                loss = loss + triplet_loss(t[0], t[1], t[2:], self.margin)
            else:
                is_pos = torch.zeros(n - 1, dtype=torch.bool, device=d.device)
                is_pos[0] = True
                loss = loss + contrastive_loss(t[0], t[1:], is_pos, self.margin)
            start += n
        return loss / max(len(sizes), 1)

    def refit_head(self, epochs: int, step: Step) -> dict[str, Any]:
        """Train the head again, on the fine-tuned backbone's features (precomputed once)."""
        cfg, nw, passes = self.cfg, self.network, self.passes
        if not nw.head_is_last or epochs <= 0:
            self.refit = {"epochs": 0}
            return self.refit
        feats, _ = passes.precompute(False)
        H.set_trainable(nw.net, nw.head_module, [])
        base_lr = cfg.head_stage_lr
        groups = H.param_groups(nw.net, nw.head_module, base_lr, cfg.weight_decay, cfg.head_lr_mult,
                                cfg.head_bias_lr_mult)
        opt = torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum)
        n = len(passes.data.samples)
        iters = D.n_batches(n, cfg.batch_size)

        sched = Schedule(cfg.schedule, epochs * iters, max(1, math.ceil(epochs / 3)) * iters, cfg.lr_gamma)
        it = 0
        for e in range(1, epochs + 1):
            order = D.epoch_order(n, cfg.seed, "refit", e)
            for b in range(iters):
                rows = feats.pos_of[order[b * cfg.batch_size:(b + 1) * cfg.batch_size]]
                rows = torch.from_numpy(rows[rows >= 0])
                sched.apply(opt, it, base_lr)
                it += 1
                if not len(rows):
                    continue
                out = nw.head(feats.x[rows].to(nw.device))
                step(opt, ce_loss(out, feats.y[rows].to(nw.device), nw.probs))
        v = passes.head_validation(feats)
        self.refit = {"epochs": epochs, **(v.numbers() if v is not None else {})}
        return self.refit
