"""The settings of a fine-tuning run: :class:`FinetuneConfig` (CLI flags map one to one)
and its validation, the settings a resumed run keeps (:data:`IDENTITY_KEYS`), and
:class:`FinetuneResult`, what a run returns."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from deepfeat.errors import UsageError
from deepfeat.finetune import data as D
from deepfeat.finetune import heads as H
from deepfeat.models.registry import DEFAULT_MODEL

SCHEDULES = ("cosine", "step", "constant")
LOSSES = ("ce", "contrastive", "triplet")
METRIC_LOSSES = ("contrastive", "triplet")
STAGES = ("head", "full")
#: the pooling of the run's descriptor (``--eval-pool default``) for classification runs,
#: on the layer ``--eval-layer default`` (the base's last feature map): chosen by
#: measurement, see docs/finetune.md "Where the gain goes"
DESCRIPTOR_POOL = "avg"


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run (CLI flags map one to one)."""

    data: str = ""
    output: str = ""
    model: str = DEFAULT_MODEL
    device: str = "auto"
    image_size: int | None = None
    val_frac: float = 0.4
    seed: int = 0
    per_class: int = 0
    augment: str = "fill"
    save_augmented: bool = False
    exclude_odd: bool = False
    # the defaults: measured on Flowers 17 and skimage-patches (docs/finetune.md "Where the gain goes")
    head_epochs: int = 10
    epochs: int = 6
    train_blocks: str = "3"
    iters_per_epoch: int | None = None
    batch_size: int = 16
    lr: float = 1e-2
    head_stage_lr: float = 1e-3
    head_lr_mult: float = 10.0
    head_bias_lr_mult: float = 20.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    lr_step: int | None = None
    lr_gamma: float = 0.1
    warmup_iters: int = 0
    clip_grad: float = 0.0
    bn: str = "frozen"
    amp: str = "auto"
    snapshot_every: int = 1
    keep_snapshots: int = 0
    val_every: int = 1
    resume: str | bool | None = None
    eval_retrieval: bool = False
    head: str = "auto"  # auto: cosine for a Linear classifier (measured better for retrieval), else linear
    head_scale: float = 16.0
    eval_layer: str = "default"
    eval_pool: str = "default"
    loss: str = "ce"
    margin: float | None = None  # None: 0.7 for contrastive, 0.1 for triplet
    neg_num: int = 5
    tuples: int | None = None
    learn_gem: bool = True
    whiten: int | None = None
    workers: int | None = None
    threads: int | None = None
    cache_images: str = "auto"
    cache_prefix: str = "auto"
    progress: str = "auto"

    def validate(self) -> None:
        if not self.output:
            raise UsageError("an output run directory is required (-o RUN_DIR)")
        if not self.resume and not self.data:
            raise UsageError("give the DATA folder (one sub-folder per class) or a path,label CSV file")
        checks = [
            (self.augment in D.AUGMENT_MODES, f"--augment {self.augment!r} unknown; choose {', '.join(D.AUGMENT_MODES)}"),
            (self.schedule in SCHEDULES, f"--schedule {self.schedule!r} unknown; choose {', '.join(SCHEDULES)}"),
            (self.bn in H.BN_MODES, f"--bn {self.bn!r} unknown; choose {', '.join(H.BN_MODES)}"),
            (self.amp in ("auto", "on", "off"), f"--amp {self.amp!r} unknown; choose auto, on, off"),
            (self.loss in LOSSES, f"--loss {self.loss!r} unknown; choose {', '.join(LOSSES)}"),
            (self.head in ("auto", *H.HEAD_KINDS), f"--head {self.head!r} unknown; choose auto, "
                                                   f"{', '.join(H.HEAD_KINDS)}"),
            (self.head_scale > 0, f"--head-scale must be > 0, not {self.head_scale}"),
            (self.cache_images in ("auto", "on", "off"), f"--cache-images {self.cache_images!r}: auto, on or off"),
            (self.cache_prefix in ("auto", "off"), f"--cache-prefix {self.cache_prefix!r}: auto or off"),
            (self.progress in ("auto", "bar", "lines", "none"), f"--progress {self.progress!r}: auto, bar, lines, none"),
            (self.head_epochs >= 0 and self.epochs >= 0, "--head-epochs and --epochs must be 0 or more"),
            (self.head_epochs + self.epochs > 0, "nothing to train: --head-epochs and --epochs are both 0"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, not {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, not {self.lr}"),
            (self.head_stage_lr > 0, f"--head-stage-lr must be > 0, not {self.head_stage_lr}"),
            (self.clip_grad >= 0, f"--clip-grad must be 0 (off) or a positive norm, not {self.clip_grad}"),
            (self.head_lr_mult > 0 and self.head_bias_lr_mult > 0, "head lr multipliers must be > 0"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), not {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, not {self.weight_decay}"),
            (self.snapshot_every >= 1, f"--snapshot-every must be at least 1, not {self.snapshot_every}"),
            (self.val_every >= 1, f"--val-every must be at least 1, not {self.val_every}"),
            (self.iters_per_epoch is None or self.iters_per_epoch >= 1, "--iters-per-epoch must be at least 1"),
            (self.lr_step is None or self.lr_step >= 1, "--lr-step must be at least 1 epoch"),
            (0 < self.lr_gamma <= 1, f"--lr-gamma must be in (0, 1], not {self.lr_gamma}"),
            (self.warmup_iters >= 0, "--warmup-iters must be 0 or more"),
            (self.per_class >= 0, f"--per-class must be 0 or more, not {self.per_class}"),
            (0 <= self.val_frac < 1, f"--val-frac must be in [0, 1), not {self.val_frac}"),
            (self.image_size is None or 16 <= self.image_size <= 4096, "--image-size must be in 16..4096"),
            (self.workers is None or self.workers >= 1, "--workers must be at least 1"),
            (self.threads is None or self.threads >= 1, "--threads must be at least 1"),
            (self.margin is None or self.margin > 0, "--margin must be > 0"),
            (self.neg_num >= 1, "--neg-num must be at least 1"),
            (self.tuples is None or self.tuples >= 1, "--tuples must be at least 1"),
            (self.whiten is None or self.whiten >= 1, "--whiten must be at least 1 dimension"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        if self.eval_retrieval and self.val_frac == 0:
            raise UsageError("--eval-retrieval measures retrieval on the validation split; --val-frac is 0")
        if self.loss in METRIC_LOSSES and self.epochs == 0:
            raise UsageError(f"--loss {self.loss} trains the backbone in the full stage; give --epochs > 0")
        if self.whiten and self.loss not in METRIC_LOSSES:
            raise UsageError("--whiten learns a whitening with a metric-learning loss; add --loss contrastive "
                             "(or triplet)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: settings that define the data, the split and the network: a resumed run must keep them
IDENTITY_KEYS = ("data", "model", "image_size", "val_frac", "seed", "per_class", "exclude_odd", "head_epochs",
                 "loss", "augment", "whiten", "head", "head_scale")


@dataclass
class FinetuneResult:
    """What a run produced (also summarised in ``RUN_DIR/meta.json``)."""

    run_dir: str
    spec: str
    classes: list[str]
    n_train: int
    n_val: int
    n_samples: int
    class_counts: list[int]
    balanced_counts: list[int]
    excluded: list[dict]
    odd: list[dict]
    history: list[dict]
    val_accuracy: float | None
    seconds: float
    retrieval: dict | None = None
    resumed_from: str | None = None
    failures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adopt_identity(cfg: FinetuneConfig, saved: dict[str, Any]) -> FinetuneConfig:
    """--resume: *cfg* with the data, split and network settings of the run's saved config
    (a new config; *cfg* is left as it is). A value the caller set explicitly to something
    else is an error."""
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    diffs = []
    adopted = {}
    for k in IDENTITY_KEYS:
        if k not in saved:
            continue
        mine = getattr(cfg, k)
        if k == "data" and mine and saved[k]:
            same = os.path.abspath(mine) == os.path.abspath(saved[k]) or mine == saved[k]
        else:
            same = mine == saved[k]
        if not same and mine != defaults[k] and not (k == "data" and not mine):
            diffs.append(f"{k}: run has {saved[k]!r}, asked {mine!r}")
        adopted[k] = saved[k]
    if diffs:
        raise UsageError("--resume keeps the run's data, split and model settings; these differ: "
                         + "; ".join(diffs) + ". Start a new -o RUN_DIR to change them")
    return replace(cfg, **adopted)
