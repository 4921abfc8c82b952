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

:func:`finetune` puts the run together from objects that each own their state: the
:class:`~deepfeat.finetune.rundir.RunDirectory`, the
:class:`~deepfeat.finetune.prepared.PreparedData` and its loaders, the
:class:`~deepfeat.finetune.network.TrainedNetwork`, the
:class:`~deepfeat.finetune.passes.Passes` that train nothing, the
:class:`~deepfeat.finetune.report.RetrievalRecord`, and the
:class:`~deepfeat.finetune.trainer.Trainer` over a
:class:`~deepfeat.finetune.state.TrainingState`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from deepfeat.finetune import data as D
from deepfeat.finetune.config import METRIC_LOSSES, FinetuneConfig, FinetuneResult
from deepfeat.finetune.network import TrainedNetwork
from deepfeat.finetune.passes import Passes
from deepfeat.finetune.prepared import Loaders, prepare_data
from deepfeat.finetune.progress import TrainingProgress
from deepfeat.finetune.report import RetrievalRecord, final_val_acc, result, save_model
from deepfeat.finetune.rundir import RunDirectory
from deepfeat.finetune.trainer import Trainer


def finetune(cfg: FinetuneConfig, on_epoch: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on the labelled images ``cfg.data`` into ``cfg.output``.

    Writes ``classes.txt``, ``train.txt``/``val.txt``, ``check.json``, ``config.json``,
    ``log.csv``/``log.json``, ``snapshots/epoch_NNN.pt``, and at the end
    ``model.safetensors`` + ``meta.json`` (the run is then the model spec
    ``finetuned:RUN_DIR``) and, with ``eval_retrieval``, ``retrieval.json``.
    *on_epoch* is called with each epoch's log entry after its snapshot is written.
    *cfg* is not changed (with ``resume``, the run uses the settings it was started with).
    """
    t_start = time.perf_counter()
    cfg.validate()
    run = RunDirectory(cfg.output)
    cfg, snap = run.open(cfg)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    progress = TrainingProgress(cfg.progress)
    data = prepare_data(cfg, run)
    network = TrainedNetwork.build(cfg, data.n_classes)
    loaders = Loaders.make(cfg, data, network.data_config)
    passes = Passes(cfg, network, data, loaders, progress)
    metric = None
    if cfg.loss in METRIC_LOSSES:
        from deepfeat.finetune.metric import MetricLearner

        metric = MetricLearner(cfg, network, passes, str(run.path))
    record = RetrievalRecord(cfg, run, network, metric, n_queries=len(data.val))
    if cfg.resume:
        record.reuse_before()
    trainer = Trainer(cfg, run, data, loaders, network, passes, record, metric, progress, on_epoch)
    if snap is not None:
        trainer.restore(snap)
    progress.line(f"{data.plan()}; {network.plan(cfg, data.n_classes)}")
    if cfg.save_augmented and not cfg.resume:
        written = D.save_augmented(run.path / "augmented", data.train, data.classes, data.samples, loaders.train,
                                   data.aug, cfg.augment, cfg.seed, epoch=1)
        progress.line(f"saved {len(written)} augmented copies to {run.path / 'augmented'}")
    trainer.train(snap)
    if cfg.eval_retrieval:
        record.finish(passes, final_val_acc(trainer.state, metric), progress)
    progress.finish()
    trainer.write_curves()  # with the final numbers
    meta = save_model(cfg, run, network, data, trainer.state, record, metric, time.perf_counter() - t_start)
    return result(cfg, run, data, loaders, trainer.state, record, meta, t_start)
