"""Fine-tuning a deepfeat model on a user's labelled images, in two stages, resumable.

Stage ``head`` trains only the new classifier on a frozen backbone. When the head is
the network's last layer (EfficientNet, ResNet, VGG...), the backbone features of
every sample are computed once and the head is trained on them: an epoch then costs
milliseconds instead of a full forward pass per image, which is what makes CPU
fine-tuning practical. Those features are of the un-augmented images (and of the
first-epoch view of each fill-up copy). Stage ``full`` trains the head and all (or the
last ``--train-blocks``) backbone units end to end on augmented images.

Everything random is seeded: the head's initialisation and dropout by the torch
generator (saved in snapshots), the order of each epoch and the transform of each
sample by their own seeded generators, so a run resumed from a snapshot continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deepfeat.finetune import data as D
from deepfeat.finetune import retrieval as R
from deepfeat.finetune.config import (
    DESCRIPTOR_POOL,
    IDENTITY_KEYS,
    LOSSES,
    METRIC_LOSSES,
    SCHEDULES,
    STAGES,
    FinetuneConfig,
    FinetuneResult,
    adopt_identity,
)
from deepfeat.finetune.losses import ce_loss
from deepfeat.finetune.passes import PassesMixin
from deepfeat.finetune.prepare import PrepareMixin
from deepfeat.finetune.progress import LOG_FIELDS, Progress, write_log
from deepfeat.finetune.report import ACCURACY_RISE_MIN, META_FORMAT, RETRIEVAL_GAIN_MIN, ReportMixin, retrieval_warning
from deepfeat.finetune.schedule import Schedule
from deepfeat.finetune.snapshots import (
    SNAPSHOT_FORMAT,
    SnapshotMixin,
    latest_snapshot,
    load_snapshot,
    now,
    rng_state,
    set_rng_state,
    snapshot_path,
)
from deepfeat.finetune.stages import StagesMixin

__all__ = [
    "ACCURACY_RISE_MIN", "DESCRIPTOR_POOL", "IDENTITY_KEYS", "LOG_FIELDS", "LOSSES", "META_FORMAT", "METRIC_LOSSES",
    "RETRIEVAL_GAIN_MIN", "SCHEDULES", "SNAPSHOT_FORMAT", "STAGES", "FinetuneConfig", "FinetuneResult", "Finetuner",
    "Schedule", "finetune", "latest_snapshot", "load_snapshot", "retrieval_warning", "snapshot_path",
]

# the names these had when they lived here
_ce = ce_loss
_Progress = Progress
_write_log = write_log
_write_json = R.write_json
_adopt_identity = adopt_identity
_rng_state, _set_rng_state, _now = rng_state, set_rng_state, now


class Finetuner(PrepareMixin, PassesMixin, StagesMixin, SnapshotMixin, ReportMixin):
    """One run: data, network, stages, snapshots. Use :func:`finetune`.

    The run's parts live in sibling modules, one mixin each, sharing this object's
    state: :mod:`.prepare` (data and network: ``train``/``val``/``samples``, ``net``,
    ``head``, ``units``/``train_units``, ``prefix``, the loaders), :mod:`.passes` (forward
    passes that train nothing: describing, validation, precomputed head features),
    :mod:`.stages` (the two training stages), :mod:`.snapshots` (``config.json``,
    snapshots, resume) and :mod:`.report` (``model.safetensors``, ``meta.json``,
    ``retrieval.json``, the result). ``metric`` is the
    :class:`~deepfeat.finetune.metric.MetricLearner` of a metric loss, else None.
    """

    def __init__(self, cfg: FinetuneConfig, on_epoch: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.on_epoch = on_epoch
        self.run = Path(cfg.output)
        self.t_start = time.perf_counter()
        self.progress = Progress(cfg.progress)
        self.history: list[dict] = []
        self.retrieval: dict[str, Any] = {}
        self.resumed_from: str | None = None

    # ----------------------------------------------------------------- setup

    def __call__(self) -> FinetuneResult:
        cfg = self.cfg
        cfg.validate()
        snap = self._prepare_run_dir()
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        self._prepare_data()
        self._prepare_model()
        self.metric = None
        if cfg.loss in METRIC_LOSSES:
            from deepfeat.finetune.metric import MetricLearner

            self.metric = MetricLearner(self)
        self.total_epochs = cfg.head_epochs + cfg.epochs
        self._seconds_before = 0.0
        self._reuse_before()
        start = self._restore(snap) if snap is not None else 0
        self._log_plan()
        if cfg.save_augmented and not cfg.resume:
            written = D.save_augmented(self.run / "augmented", self.train, self.classes, self.samples, self.loader,
                                       self.aug, cfg.augment, cfg.seed, epoch=1)
            self.progress.line(f"saved {len(written)} augmented copies to {self.run / 'augmented'}")
        self._run_stages(start, snap)
        if cfg.eval_retrieval:
            self._finish_retrieval()
        self.progress.finish()
        self._write_curves()  # with the final numbers
        meta = self._save_model()
        return self._result(meta)


def finetune(cfg: FinetuneConfig, on_epoch: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on the labelled images ``cfg.data`` into ``cfg.output``.

    Writes ``classes.txt``, ``train.txt``/``val.txt``, ``check.json``, ``config.json``,
    ``log.csv``/``log.json``, ``snapshots/epoch_NNN.pt``, and at the end
    ``model.safetensors`` + ``meta.json`` (the run is then the model spec
    ``finetuned:RUN_DIR``) and, with ``eval_retrieval``, ``retrieval.json``.
    *on_epoch* is called with each epoch's log entry after its snapshot is written.
    """
    return Finetuner(cfg, on_epoch)()
