"""The training loop of a fine-tuning run, in two stages: ``head`` (the new head alone on a
frozen backbone, on precomputed features when the head is the last layer) then
``full`` (head and the trained backbone units end to end, cross-entropy or a metric
loss), each with its own optimizer and learning-rate schedule; an epoch ends with its
log entry and snapshot."""

from __future__ import annotations

import math
import time

import torch

from deepfeat.errors import DeepfeatError
from deepfeat.finetune import data as D
from deepfeat.finetune import heads as H
from deepfeat.finetune.config import METRIC_LOSSES
from deepfeat.finetune.losses import ce_loss
from deepfeat.finetune.progress import write_log
from deepfeat.finetune.schedule import Schedule
from deepfeat.finetune.snapshots import latest_snapshot


class StagesMixin:
    """:class:`~deepfeat.finetune.train.Finetuner`'s stages."""

    def _run_stages(self, start: int, snap: dict | None) -> None:
        """The epochs after *start* (0, or a snapshot's), head stage then full stage, and
        with a metric loss the head re-fitted on the new backbone."""
        cfg = self.cfg
        self.after_eval = None
        self.progress.epochs(self.total_epochs, min(start, self.total_epochs))
        if start < cfg.head_epochs:
            self._stage_head(start, snap)
        if cfg.epochs and start < self.total_epochs:
            self._stage_full(max(0, start - cfg.head_epochs), snap if start >= cfg.head_epochs else None)
        if self.metric is not None:
            refit = self.metric.refit_head(cfg.head_epochs or 5)
            self.progress.line(f"head re-fitted on the metric-learned backbone ({refit.get('epochs', 0)} epochs)"
                               + (f": val acc {100 * refit['val_acc']:.1f}%" if refit.get("val_acc") is not None
                                  else ""))

    def _train_mode(self) -> None:
        """Training mode for the head and the trained units; frozen units in eval mode
        (their BatchNorm statistics and dropout as at inference); BatchNorm per ``--bn``."""
        self.net.train()
        live = set(self.train_units)
        for name in self.units:
            if name not in live:
                self.net.get_submodule(name).eval()
        H.set_bn_mode(self.net, self.cfg.bn, self.train_units)

    def _stage_iters(self, n_samples: int) -> int:
        if self.cfg.iters_per_epoch:
            return int(self.cfg.iters_per_epoch)
        return D.n_batches(n_samples, self.cfg.batch_size)

    def _make_optimizer(self, stage: str) -> tuple[torch.optim.Optimizer, float]:
        cfg = self.cfg
        units = [] if stage == "head" else self.train_units
        H.set_trainable(self.net, self.head_module, units)
        base_lr = cfg.head_stage_lr if stage == "head" else cfg.lr
        groups = H.param_groups(self.net, self.head_module, base_lr, cfg.weight_decay, cfg.head_lr_mult,
                                cfg.head_bias_lr_mult)
        if stage == "full" and cfg.loss in METRIC_LOSSES and self.metric is not None:
            groups += self.metric.param_groups(base_lr)
        return torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum), base_lr

    def _schedule(self, stage_epochs: int, iters: int) -> Schedule:
        cfg = self.cfg
        step = (cfg.lr_step or max(1, math.ceil(stage_epochs / 3))) * iters
        return Schedule(cfg.schedule, stage_epochs * iters, step, cfg.lr_gamma, cfg.warmup_iters)

    def _end_epoch(self, entry: dict, stage: str, opt: torch.optim.Optimizer, it: int, last_of_stage: bool) -> None:
        entry = {k: v for k, v in entry.items() if not k.startswith("_")}
        self.history.append(entry)
        write_log(self.run, self.history)
        e = entry["epoch"]
        parts = [f"epoch {e}/{self.total_epochs} [{stage}]", f"loss {entry['train_loss']:.4f}"]
        if entry.get("train_acc") is not None:
            parts.append(f"acc {100 * entry['train_acc']:.1f}%")
        if entry.get("gem_p") is not None:
            parts.append(f"GeM p {entry['gem_p']:.3f}")
        if entry.get("val_acc") is not None:
            parts.append(f"val loss {entry['val_loss']:.4f} val acc {100 * entry['val_acc']:.1f}%")
        if entry.get("val_map") is not None:
            parts.append(f"val mAP {100 * entry['val_map']:.2f}%")
        parts.append(f"{entry['seconds']:.0f}s")
        if e % self.cfg.snapshot_every == 0 or last_of_stage:
            path = self._snapshot(e, stage, opt, it)
            parts.append(f"snapshot {path.name}")
        self.progress.line(", ".join(parts))
        self.progress.epoch_done(entry)
        self._write_curves()
        if self.on_epoch is not None:
            self.on_epoch(dict(entry))

    def _stage_head(self, start: int, snap: dict | None) -> None:
        """Epochs ``start+1 .. head_epochs``: the head alone, on a frozen backbone."""
        cfg = self.cfg
        E1 = cfg.head_epochs
        opt, base_lr = self._make_optimizer("head")
        iters = self._stage_iters(len(self.samples))
        sched = self._schedule(E1, iters)
        it = 0
        if snap is not None and snap["stage"] == "head":
            opt.load_state_dict(snap["optimizer"])
            it = int(snap["scheduler"]["iteration"])
        need_before = cfg.eval_retrieval and "before" not in self.retrieval
        feats = None
        if self.head_is_last:
            t0 = time.perf_counter()
            feats = self._precompute(need_before)
            self.progress.line(f"head stage: backbone features of {len(feats['x'])} training samples and "
                               f"{len(feats['vx'])} validation images computed once in "
                               f"{time.perf_counter() - t0:.0f}s")
        elif need_before:
            self._before_eval()
        for e in range(start + 1, E1 + 1):
            t0 = time.perf_counter()
            order = D.epoch_order(len(self.samples), cfg.seed, "head", e,
                                  iters * cfg.batch_size if cfg.iters_per_epoch else None)
            tot_loss = tot_ok = tot_n = 0.0
            self.progress.start(iters, f"epoch {e} [head]")
            lr = base_lr
            for b in range(iters):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                if not len(idx):
                    break
                lr = sched.apply(opt, it, base_lr)
                if feats is not None:
                    keep = feats["pos_of"][idx]
                    keep = keep[keep >= 0]
                    if not len(keep):
                        it += 1
                        continue
                    keep = torch.from_numpy(keep)
                    x, y = feats["x"][keep].to(self.device), feats["y"][keep].to(self.device)
                    self.head.train()
                    with self._autocast():
                        out = self.head(x)
                else:
                    xb, yb = self._load_batch([self.samples[i] for i in idx], e)
                    if xb is None:
                        it += 1
                        continue
                    self.net.eval()  # the backbone is frozen and runs as at inference
                    self.head.train()
                    x, y = xb, yb
                    with self._autocast():
                        out = self.net(self.normalize(x))
                loss = ce_loss(out, y, self.probs)
                self._step(opt, loss)
                it += 1
                tot_loss += loss.item() * len(y)
                tot_ok += float((out.detach().flatten(1).argmax(1) == y).sum())
                tot_n += len(y)
                self.progress.update(loss.item(), acc=tot_ok / tot_n)
            self.progress.close()
            entry = {"epoch": e, "stage": "head", "iters": iters, "images": int(tot_n),
                     "train_loss": tot_loss / max(tot_n, 1), "train_acc": tot_ok / max(tot_n, 1), "lr": lr}
            if e % cfg.val_every == 0 or e == E1:
                if feats is not None:
                    entry.update(self._val_features(feats))
                else:
                    entry.update(self._val_pass(False))
                if "before" in self.retrieval:  # the backbone is frozen: descriptors are the base model's
                    entry.update(val_map=self.retrieval["before"]["map"],
                                 val_mp10=self.retrieval["before"]["mp_at_k"]["10"])
            entry["seconds"] = time.perf_counter() - t0
            self._end_epoch(entry, "head", opt, it, e == E1)

    def _load_batch(self, samples: list[D.Sample], epoch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One training batch, decoded and augmented in this thread (the slow path)."""
        x, y, _ = self.loader._build(samples, self.aug, self.cfg.augment, self.cfg.seed, epoch)
        if not len(y):
            return None, None
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def _step(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()):
            last = latest_snapshot(self.run)
            raise DeepfeatError(
                f"training diverged (loss {loss.item()}): lower --lr (now {self.cfg.lr}) or set --clip-grad; "
                + (f"continue from the last snapshot with `deepfeat finetune -o {self.run} --resume {last.name} "
                   f"--lr ...`" if last else "no snapshot was written yet"))
        opt.zero_grad(set_to_none=True)
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.cfg.clip_grad:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            if self.cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
            opt.step()

    def _stage_full(self, start: int, snap: dict | None) -> None:
        """Epochs ``head_epochs+start+1 .. total``: head and backbone units end to end."""
        cfg = self.cfg
        E1, E2 = cfg.head_epochs, cfg.epochs
        opt, base_lr = self._make_optimizer("full")
        iters = self.metric.iters_per_epoch() if self.metric is not None else self._stage_iters(len(self.samples))
        sched = self._schedule(E2, iters)
        it = 0
        if snap is not None and snap["stage"] == "full":
            opt.load_state_dict(snap["optimizer"])
            it = int(snap["scheduler"]["iteration"])
            if self.scaler is not None and snap.get("scaler"):
                self.scaler.load_state_dict(snap["scaler"])
        if cfg.eval_retrieval and "before" not in self.retrieval:
            self._before_eval()
        for e in range(E1 + start + 1, E1 + E2 + 1):
            t0 = time.perf_counter()
            if self.metric is not None:
                entry = self.metric.epoch(self, e, opt, sched, base_lr, it)
                it = entry.pop("_it")
            else:
                entry, it = self._ce_epoch(e, opt, sched, base_lr, it, iters)
            if (e - E1) % cfg.val_every == 0 or e == E1 + E2:
                v = self._val_pass(cfg.eval_retrieval)
                ev = v.pop("_eval", None)
                entry.update(v)
                if ev is not None:
                    self.after_eval = ev
            entry["seconds"] = time.perf_counter() - t0
            self._end_epoch(entry, "full", opt, it, e == E1 + E2)

    def _ce_epoch(self, e: int, opt, sched: Schedule, base_lr: float, it: int, iters: int) -> tuple[dict, int]:
        cfg = self.cfg
        order = D.epoch_order(len(self.samples), cfg.seed, "full", e,
                              iters * cfg.batch_size if cfg.iters_per_epoch else None)
        batch_samples = [self.samples[i] for i in order]
        tot_loss = tot_ok = tot_n = 0.0
        self.progress.start(iters, f"epoch {e} [full]")
        lr = base_lr
        for b, (x, y, pos) in enumerate(self.loader.batches(batch_samples, cfg.batch_size, aug=self.aug,
                                                           mode=cfg.augment, seed=cfg.seed, epoch=e)):
            if b >= iters:
                break
            lr = sched.apply(opt, it, base_lr)
            it += 1
            if not len(y) or (cfg.bn == "train" and len(y) < 2):
                continue
            self._train_mode()
            yt = torch.from_numpy(y).to(self.device)
            keys = [self._train_key(batch_samples[p]) for p in pos] if self.prefix is not None else None
            with self._autocast():
                out = self.forward_from(x, keys, self.net)
            loss = ce_loss(out, yt, self.probs)
            self._step(opt, loss)
            tot_loss += loss.item() * len(yt)
            tot_ok += float((out.detach().flatten(1).argmax(1) == yt).sum())
            tot_n += len(yt)
            self.progress.update(loss.item(), acc=tot_ok / tot_n)
        self.progress.close()
        return ({"epoch": e, "stage": "full", "iters": iters, "images": int(tot_n),
                 "train_loss": tot_loss / max(tot_n, 1), "train_acc": tot_ok / max(tot_n, 1), "lr": lr}, it)
