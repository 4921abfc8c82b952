"""The training loop of a fine-tuning run, in two stages: ``head`` (the new head alone on a
frozen backbone, on precomputed features when the head is the last layer) then ``full``
(head and the trained backbone units end to end, cross-entropy or a metric loss), each
with its own optimizer and learning-rate schedule; an epoch ends with its log entry and
snapshot. The :class:`Trainer` advances a :class:`~deepfeat.finetune.state.TrainingState`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from deepfeat import __version__
from deepfeat.errors import DeepfeatError, UsageError
from deepfeat.finetune import data as D
from deepfeat.finetune import heads as H
from deepfeat.finetune.config import FinetuneConfig
from deepfeat.finetune.losses import ce_loss
from deepfeat.finetune.network import TrainedNetwork
from deepfeat.finetune.passes import HeadFeatures, Passes
from deepfeat.finetune.prepared import Loaders, PreparedData
from deepfeat.finetune.progress import TrainingProgress, epoch_line
from deepfeat.finetune.report import RetrievalRecord
from deepfeat.finetune.rundir import RunDirectory
from deepfeat.finetune.schedule import Schedule
from deepfeat.finetune.snapshots import SNAPSHOT_FORMAT, now, rng_state, set_rng_state
from deepfeat.finetune.state import LogEntry, TrainingState

if TYPE_CHECKING:
    from deepfeat.finetune.metric import MetricLearner


class Trainer:
    """Trains *network* on *data* through the two stages, writing the log and snapshots into
    *run*; ``state`` says where it stands. *on_epoch* is called with each epoch's log entry
    (as a dict) after its snapshot is written."""

    def __init__(self, cfg: FinetuneConfig, run: RunDirectory, data: PreparedData, loaders: Loaders,
                 network: TrainedNetwork, passes: Passes, record: RetrievalRecord, metric: MetricLearner | None,
                 progress: TrainingProgress, on_epoch: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.run = run
        self.data = data
        self.loaders = loaders
        self.network = network
        self.passes = passes
        self.record = record
        self.metric = metric
        self.progress = progress
        self.on_epoch = on_epoch
        self.state = TrainingState()
        self.total_epochs = cfg.head_epochs + cfg.epochs

    # ----------------------------------------------------------------- resume

    def restore(self, snap: dict[str, Any]) -> None:
        """Continue from *snap*: its weights, metric-learning state, RNG state and history;
        the optimizer and schedule state are restored when its stage starts."""
        what = f"snapshot {self.run.resumed_from}"
        if list(snap["classes"]) != list(self.data.classes) or snap["head_module"] != self.network.head_module:
            raise UsageError(f"{what} was made for other classes or another model; resume it in its own run "
                             "directory")
        self.network.load_checkpoint(snap["model"], what)
        if self.metric is not None and snap.get("metric"):
            self.metric.load_state_dict(snap["metric"])
        set_rng_state(snap["rng"])
        history = [LogEntry.from_dict(h) for h in snap["history"]]
        self.state = TrainingState(stage=snap["stage"], epoch=int(snap["epoch"]),
                                   iteration=int(snap["scheduler"]["iteration"]), history=history,
                                   seconds_before=sum(float(h.seconds or 0) for h in history))
        self.run.write_log(history)
        self.progress.line(f"resuming from {self.run.resumed_from} (epoch {self.state.epoch} of {self.total_epochs})")

    def _snapshot(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        st, nw = self.state, self.network
        return {
            "format": SNAPSHOT_FORMAT,
            "epoch": st.epoch,
            "stage": st.stage,
            "model": nw.checkpoint(),
            "optimizer": opt.state_dict(),
            "scheduler": {"kind": self.cfg.schedule, "iteration": st.iteration},
            "scaler": nw.scaler.state_dict() if nw.scaler is not None else {},
            "metric": self.metric.state_dict() if self.metric is not None else {},
            "rng": rng_state(),
            "history": st.history_dicts(),
            "classes": list(self.data.classes),
            "base_model": self.cfg.model,
            "head_module": nw.head_module,
            "deepfeat_version": __version__,
            "saved": now(),
        }

    # ----------------------------------------------------------------- stages

    def train(self, snap: dict[str, Any] | None) -> None:
        """The epochs after the state's (0, or a snapshot's), head stage then full stage, and
        with a metric loss the head re-fitted on the new backbone. *snap*: the snapshot the
        state was restored from, whose optimizer state its stage continues with."""
        cfg, start = self.cfg, self.state.epoch
        self.progress.epochs(self.total_epochs, min(start, self.total_epochs))
        if start < cfg.head_epochs:
            self._stage_head(snap if snap is not None and snap["stage"] == "head" else None)
        if cfg.epochs and self.state.epoch < self.total_epochs:
            self._stage_full(snap if snap is not None and snap["stage"] == "full" else None)
        if self.metric is not None:
            refit = self.metric.refit_head(cfg.head_epochs or 5, self.step)
            self.progress.line(f"head re-fitted on the metric-learned backbone ({refit.get('epochs', 0)} epochs)"
                               + (f": val acc {100 * refit['val_acc']:.1f}%" if refit.get("val_acc") is not None
                                  else ""))

    def _begin_stage(self, stage: str, snap: dict[str, Any] | None) -> tuple[torch.optim.Optimizer, float]:
        """The stage's optimizer (from *snap* when it was saved in this stage) and base rate."""
        cfg, nw = self.cfg, self.network
        H.set_trainable(nw.net, nw.head_module, [] if stage == "head" else nw.train_units)
        base_lr = cfg.head_stage_lr if stage == "head" else cfg.lr
        groups = H.param_groups(nw.net, nw.head_module, base_lr, cfg.weight_decay, cfg.head_lr_mult,
                                cfg.head_bias_lr_mult)
        if stage == "full" and self.metric is not None:
            groups += self.metric.param_groups(base_lr)
        opt = torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum)
        self.state.stage, self.state.iteration = stage, 0
        if snap is not None:
            opt.load_state_dict(snap["optimizer"])
            self.state.iteration = int(snap["scheduler"]["iteration"])
            if stage == "full" and nw.scaler is not None and snap.get("scaler"):
                nw.scaler.load_state_dict(snap["scaler"])
        return opt, base_lr

    def _iters(self, n_samples: int) -> int:
        if self.cfg.iters_per_epoch:
            return int(self.cfg.iters_per_epoch)
        return D.n_batches(n_samples, self.cfg.batch_size)

    def _schedule(self, stage_epochs: int, iters: int) -> Schedule:
        cfg = self.cfg
        step = (cfg.lr_step or max(1, math.ceil(stage_epochs / 3))) * iters
        return Schedule(cfg.schedule, stage_epochs * iters, step, cfg.lr_gamma, cfg.warmup_iters)

    def _stage_head(self, snap: dict[str, Any] | None) -> None:
        """Epochs up to ``head_epochs``: the head alone, on a frozen backbone."""
        cfg, nw = self.cfg, self.network
        E1 = cfg.head_epochs
        opt, base_lr = self._begin_stage("head", snap)
        iters = self._iters(len(self.data.samples))
        sched = self._schedule(E1, iters)
        need_before = cfg.eval_retrieval and not self.record.has_before
        feats = None
        if nw.head_is_last:
            t0 = time.perf_counter()
            feats, before = self.passes.precompute(need_before)
            if before is not None:
                self.record.set_before(before)
            self.progress.line(f"head stage: backbone features of {len(feats.x)} training samples and "
                               f"{len(feats.vx)} validation images computed once in "
                               f"{time.perf_counter() - t0:.0f}s")
        elif need_before:
            self.record.set_before(self.passes.before())
        for e in range(self.state.epoch + 1, E1 + 1):
            t0 = time.perf_counter()
            entry = self._head_epoch(e, opt, sched, base_lr, iters, feats)
            if e % cfg.val_every == 0 or e == E1:
                v = self.passes.head_validation(feats) if feats is not None else self.passes.validate(False)
                _put(entry, v.numbers() if v is not None else {})
                if self.record.has_before:  # the backbone is frozen: descriptors are the base model's
                    _put(entry, self.record.before_numbers())
            entry.seconds = time.perf_counter() - t0
            self._end_epoch(entry, opt, e == E1)

    def _head_epoch(self, e: int, opt: torch.optim.Optimizer, sched: Schedule, base_lr: float, iters: int,
                    feats: HeadFeatures | None) -> LogEntry:
        cfg, nw, st = self.cfg, self.network, self.state
        order = D.epoch_order(len(self.data.samples), cfg.seed, "head", e,
                              iters * cfg.batch_size if cfg.iters_per_epoch else None)
        tot_loss = tot_ok = tot_n = 0.0
        self.progress.start(iters, f"epoch {e} [head]")
        lr = base_lr
        for b in range(iters):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if not len(idx):
                break
            lr = sched.apply(opt, st.iteration, base_lr)
            if feats is not None:
                keep = feats.pos_of[idx]
                keep = keep[keep >= 0]
                if not len(keep):
                    st.iteration += 1
                    continue
                keep = torch.from_numpy(keep)
                x, y = feats.x[keep].to(nw.device), feats.y[keep].to(nw.device)
                nw.head.train()
                with nw.autocast():
                    out = nw.head(x)
            else:
                x, y = self._load_batch([self.data.samples[i] for i in idx], e)
                if x is None:
                    st.iteration += 1
                    continue
                nw.net.eval()  # the backbone is frozen and runs as at inference
                nw.head.train()
                with nw.autocast():
                    out = nw.net(nw.normalize(x))
            loss = ce_loss(out, y, nw.probs)
            self.step(opt, loss)
            st.iteration += 1
            tot_loss += loss.item() * len(y)
            tot_ok += float((out.detach().flatten(1).argmax(1) == y).sum())
            tot_n += len(y)
            self.progress.update(loss.item(), acc=tot_ok / tot_n)
        self.progress.close()
        return LogEntry(epoch=e, stage="head", iters=iters, images=int(tot_n), train_loss=tot_loss / max(tot_n, 1),
                        train_acc=tot_ok / max(tot_n, 1), lr=lr)

    def _load_batch(self, samples: list[D.Sample], epoch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One training batch, decoded and augmented in this thread (the slow path)."""
        x, y, _ = self.loaders.train._build(samples, self.data.aug, self.cfg.augment, self.cfg.seed, epoch)
        if not len(y):
            return None, None
        dev = self.network.device
        return torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)

    def _stage_full(self, snap: dict[str, Any] | None) -> None:
        """Epochs after ``head_epochs``: head and backbone units end to end."""
        cfg = self.cfg
        E1, E2 = cfg.head_epochs, cfg.epochs
        opt, base_lr = self._begin_stage("full", snap)
        iters = self.metric.iters_per_epoch() if self.metric is not None else self._iters(len(self.data.samples))
        sched = self._schedule(E2, iters)
        if cfg.eval_retrieval and not self.record.has_before:
            self.record.set_before(self.passes.before())
        for e in range(max(E1, self.state.epoch) + 1, E1 + E2 + 1):
            t0 = time.perf_counter()
            if self.metric is not None:
                entry, self.state.iteration = self.metric.epoch(e, opt, sched, base_lr, self.state.iteration,
                                                                self.step, self.progress)
            else:
                entry = self._ce_epoch(e, opt, sched, base_lr, iters)
            if (e - E1) % cfg.val_every == 0 or e == E1 + E2:
                v = self.passes.validate(cfg.eval_retrieval)
                if v is not None:
                    _put(entry, v.numbers())
                    if v.retrieval is not None:
                        self.record.after_eval = v.retrieval
            entry.seconds = time.perf_counter() - t0
            self._end_epoch(entry, opt, e == E1 + E2)

    def _ce_epoch(self, e: int, opt: torch.optim.Optimizer, sched: Schedule, base_lr: float,
                  iters: int) -> LogEntry:
        cfg, nw, st = self.cfg, self.network, self.state
        order = D.epoch_order(len(self.data.samples), cfg.seed, "full", e,
                              iters * cfg.batch_size if cfg.iters_per_epoch else None)
        batch_samples = [self.data.samples[i] for i in order]
        tot_loss = tot_ok = tot_n = 0.0
        self.progress.start(iters, f"epoch {e} [full]")
        lr = base_lr
        for b, (x, y, pos) in enumerate(self.loaders.train.batches(batch_samples, cfg.batch_size, aug=self.data.aug,
                                                                   mode=cfg.augment, seed=cfg.seed, epoch=e)):
            if b >= iters:
                break
            lr = sched.apply(opt, st.iteration, base_lr)
            st.iteration += 1
            if not len(y) or (cfg.bn == "train" and len(y) < 2):
                continue
            nw.train_mode(cfg.bn)
            yt = torch.from_numpy(y).to(nw.device)
            keys = [self.passes.train_key(batch_samples[p]) for p in pos] if nw.prefix is not None else None
            with nw.autocast():
                out = nw.forward_from(x, keys, nw.net)
            loss = ce_loss(out, yt, nw.probs)
            self.step(opt, loss)
            tot_loss += loss.item() * len(yt)
            tot_ok += float((out.detach().flatten(1).argmax(1) == yt).sum())
            tot_n += len(yt)
            self.progress.update(loss.item(), acc=tot_ok / tot_n)
        self.progress.close()
        return LogEntry(epoch=e, stage="full", iters=iters, images=int(tot_n), train_loss=tot_loss / max(tot_n, 1),
                        train_acc=tot_ok / max(tot_n, 1), lr=lr)

    # ----------------------------------------------------------------- steps and epochs

    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One optimizer step on *loss* (scaled under mixed precision, clipped with
        ``--clip-grad``); a loss that is not finite stops the run with what to do next."""
        cfg, scaler = self.cfg, self.network.scaler
        if not torch.isfinite(loss.detach()):
            last = self.run.latest_snapshot()
            raise DeepfeatError(
                f"training diverged (loss {loss.item()}): lower --lr (now {cfg.lr}) or set --clip-grad; "
                + (f"continue from the last snapshot with `deepfeat finetune -o {self.run} --resume {last.name} "
                   f"--lr ...`" if last else "no snapshot was written yet"))
        opt.zero_grad(set_to_none=True)
        params = [p for g in opt.param_groups for p in g["params"]]
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.clip_grad:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()

    def _end_epoch(self, entry: LogEntry, opt: torch.optim.Optimizer, last_of_stage: bool) -> None:
        """Record *entry*: the history, the log files, the snapshot, the progress, the curves."""
        st = self.state
        st.epoch = entry.epoch
        st.history.append(entry)
        self.run.write_log(st.history)
        snapshot = None
        if entry.epoch % self.cfg.snapshot_every == 0 or last_of_stage:
            snapshot = self.run.save_snapshot(self._snapshot(opt), self.cfg.keep_snapshots).name
        self.progress.line(epoch_line(entry, self.total_epochs, snapshot))
        self.progress.epoch_done(entry)
        self.write_curves()
        if self.on_epoch is not None:
            self.on_epoch(entry.to_dict())

    def write_curves(self) -> None:
        from pathlib import Path

        self.run.write_curves(self.state.history, f"{self.cfg.model} fine-tuned on {Path(self.data.root).name}")


def _put(entry: LogEntry, numbers: dict[str, float]) -> None:
    """Set the measured *numbers* (``val_loss``, ``val_map``...) on *entry*."""
    for k, v in numbers.items():
        setattr(entry, k, v)
