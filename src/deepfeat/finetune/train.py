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

import csv
import io
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import DeepfeatError, ModelError, UsageError
from ..models.registry import DEFAULT_MODEL
from . import data as D
from . import heads as H
from . import retrieval as R

log = logging.getLogger(__name__)

META_FORMAT = "deepfeat-finetuned/1"
SNAPSHOT_FORMAT = "deepfeat-finetune-snapshot/1"
SCHEDULES = ("cosine", "step", "constant")
LOSSES = ("ce", "contrastive", "triplet")
METRIC_LOSSES = ("contrastive", "triplet")
STAGES = ("head", "full")
#: the pooling of the run's descriptor (``--eval-pool default``) for classification runs,
#: on the layer ``--eval-layer default`` (the base's last feature map): chosen by
#: measurement, see docs/finetune.md "Where the gain goes"
DESCRIPTOR_POOL = "avg"
#: --eval-retrieval warns when accuracy rose but the mAP gain is below this (absolute)
RETRIEVAL_GAIN_MIN = 0.01
#: ... "accuracy rose": final validation accuracy at least this far above chance (1/classes)
ACCURACY_RISE_MIN = 0.05


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


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, obj: Any) -> None:
    from ..store import atomic_write_json

    atomic_write_json(path, obj)


def _rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors/lists, so ``torch.load(weights_only=True)`` reads it."""
    np_state = np.random.get_state()
    py = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py[0]), "state": list(py[1]), "gauss": py[2]},
    }
    if torch.cuda.is_available():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Schedule:
    """Learning-rate factor per iteration of a stage: cosine to 0, step decay every
    ``step_iters``, or constant; optional linear warm-up. Pure function of the
    iteration, so resuming only needs the iteration number."""

    def __init__(self, kind: str, total_iters: int, step_iters: int, gamma: float, warmup: int = 0):
        self.kind, self.total, self.step, self.gamma, self.warmup = kind, max(1, total_iters), max(1, step_iters), \
            gamma, warmup

    def factor(self, it: int) -> float:
        w = min(1.0, (it + 1) / self.warmup) if self.warmup else 1.0
        if self.kind == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * min(it, self.total) / self.total))
        elif self.kind == "step":
            f = self.gamma ** (it // self.step)
        else:
            f = 1.0
        return w * f

    def apply(self, opt: torch.optim.Optimizer, it: int, base_lr: float) -> float:
        f = self.factor(it)
        for g in opt.param_groups:
            g["lr"] = base_lr * g.get("lr_mult", 1.0) * f
        return base_lr * f


class _Progress:
    """Progress of a run: on a terminal (``bar``) an epoch bar (epochs done, last epoch's
    loss, accuracy, validation accuracy / mAP and seconds per epoch) above a bar of the
    current pass (iterations, running loss and accuracy); otherwise (``lines``) one line
    per epoch with the same numbers plus a line every 30 s within a long pass; or nothing."""

    def __init__(self, mode: str):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.bar = None
        self.epoch_bar = None
        self.last = 0.0

    def epochs(self, total: int, done: int = 0) -> None:
        """Open the epoch bar (``bar`` mode) at *done* of *total* epochs."""
        if self.mode != "bar":
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.mode = "lines"
            return
        self.epoch_bar = tqdm(total=total, initial=done, desc="fine-tuning", unit="epoch", dynamic_ncols=True,
                              position=0, leave=True)

    def epoch_done(self, entry: dict) -> None:
        if self.epoch_bar is None:
            return
        post = [f"{entry['stage']}", f"loss {entry['train_loss']:.4f}"]
        if entry.get("train_acc") is not None:
            post.append(f"acc {100 * entry['train_acc']:.1f}%")
        if entry.get("val_acc") is not None:
            post.append(f"val acc {100 * entry['val_acc']:.1f}%")
        if entry.get("val_map") is not None:
            post.append(f"val mAP {100 * entry['val_map']:.1f}%")
        post.append(f"{entry['seconds']:.1f}s/epoch")
        self.epoch_bar.set_postfix_str(", ".join(post), refresh=False)
        self.epoch_bar.update(1)

    def start(self, total: int, desc: str) -> None:
        self.total, self.done, self.desc = total, 0, desc
        self.t0 = self.last = time.perf_counter()
        if self.mode == "bar":
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, leave=False,
                                position=1 if self.epoch_bar is not None else 0)
            except ImportError:
                self.mode = "lines"

    def update(self, loss: float | None = None, n: int = 1, acc: float | None = None) -> None:
        self.done += n
        post = ", ".join(([f"loss {loss:.4f}"] if loss is not None else [])
                         + ([f"acc {100 * acc:.1f}%"] if acc is not None else []))
        if self.bar is not None:
            self.bar.update(n)
            if post:
                self.bar.set_postfix_str(post, refresh=False)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self.last >= 30:
                self.last = now
                rate = self.done / (now - self.t0)
                eta = (self.total - self.done) / rate if rate > 0 else float("nan")
                print(f"  {self.desc}: {self.done}/{self.total}{', ' + post if post else ''}, {rate:.2f}/s, "
                      f"ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self) -> None:
        self.close()
        if self.epoch_bar is not None:
            self.epoch_bar.close()
            self.epoch_bar = None

    def line(self, text: str) -> None:
        log.info(text)
        if self.mode == "none":
            return
        if self.epoch_bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)


LOG_FIELDS = ("epoch", "stage", "iters", "images", "train_loss", "train_acc", "val_loss", "val_acc", "val_map",
              "val_mp10", "lr", "seconds")


def _write_log(run: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(LOG_FIELDS), extrasaction="ignore")
    w.writeheader()
    for h in history:
        w.writerow({k: ("" if h.get(k) is None else (f"{h[k]:.6g}" if isinstance(h[k], float) else h[k]))
                    for k in LOG_FIELDS})
    from ..store import atomic_write_bytes

    atomic_write_bytes(run / "log.csv", buf.getvalue().encode())
    atomic_write_bytes(run / "log.json", (json.dumps(history, indent=1) + "\n").encode())


def snapshot_path(run: str | Path, epoch: int) -> Path:
    return Path(run) / "snapshots" / f"epoch_{epoch:03d}.pt"


def latest_snapshot(run: str | Path) -> Path | None:
    snaps = sorted((Path(run) / "snapshots").glob("epoch_*.pt"))
    return snaps[-1] if snaps else None


def load_snapshot(path: str | Path) -> dict[str, Any]:
    """Read a snapshot safely (``weights_only=True``) and check its format."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"snapshot not found: {p}")
    try:
        snap = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot read snapshot {p}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        raise ModelError(f"{p} is not a deepfeat fine-tuning snapshot")
    return snap


def _ce(out: torch.Tensor, y: torch.Tensor, probs: bool, reduction: str = "mean") -> torch.Tensor:
    out = out.float().flatten(1)
    if probs:  # a network ending in Softmax (Caffe): NLL of its probabilities
        return F.nll_loss(out.clamp_min(1e-12).log(), y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


class Finetuner:
    """One run: data, network, stages, snapshots. Use :func:`finetune`."""

    def __init__(self, cfg: FinetuneConfig, on_epoch: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.on_epoch = on_epoch
        self.run = Path(cfg.output)
        self.t_start = time.perf_counter()
        self.progress = _Progress(cfg.progress)
        self.history: list[dict] = []
        self.retrieval: dict[str, Any] = {}
        self.resumed_from: str | None = None

    # ----------------------------------------------------------------- setup

    def _prepare_run_dir(self) -> dict | None:
        cfg = self.cfg
        snap = None
        if cfg.resume:
            if not (self.run / "config.json").is_file():
                raise UsageError(f"--resume: {self.run} is not a fine-tuning run directory (no config.json)")
            saved = json.loads((self.run / "config.json").read_text(encoding="utf-8"))["config"]
            _adopt_identity(cfg, saved)
            if cfg.resume is True or cfg.resume in ("latest", "", "true"):
                path = latest_snapshot(self.run)
            else:
                path = Path(str(cfg.resume))
                if not path.is_file() and (self.run / "snapshots" / str(cfg.resume)).is_file():
                    path = self.run / "snapshots" / str(cfg.resume)
            if path is not None:
                snap = load_snapshot(path)
                self.resumed_from = str(path)
            else:
                log.warning("--resume: no snapshot in %s yet; starting from the beginning", self.run)
        else:
            if (self.run / "meta.json").is_file() or latest_snapshot(self.run) is not None:
                raise UsageError(f"{self.run} already holds a fine-tuning run; continue it with --resume, or give "
                                 "another -o RUN_DIR")
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / "snapshots").mkdir(exist_ok=True)
        created = _now()
        if (self.run / "config.json").is_file():
            created = json.loads((self.run / "config.json").read_text(encoding="utf-8")).get("created", created)
        self.created = created
        _write_json(self.run / "config.json", {"created": created, "deepfeat_version": __version__,
                                               "config": cfg.to_dict()})
        return snap

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
            from ..store import atomic_write_bytes

            atomic_write_bytes(run / "classes.txt", ("\n".join(self.classes) + "\n").encode("utf-8"))
            D.write_split(run / "train.txt", self.train, self.root)
            D.write_split(run / "val.txt", self.val, self.root)
            _write_json(run / "check.json", {"root": self.root, "source": str(cfg.data), "excluded": self.excluded,
                                             "odd": self.odd, "counts": dict(zip(self.classes, ds.counts()))})
        if not self.train:
            raise UsageError("no training images left after the split")
        self.samples = D.balance(self.train, len(self.classes), cfg.per_class)
        self.val_samples = [D.Sample(i, it.label, 0) for i, it in enumerate(self.val)]
        self.aug = D.Augmentation() if cfg.augment != "none" else None

    def _workers(self) -> int:
        return self.cfg.workers or min(4, max(1, os.cpu_count() or 1))

    def _prepare_model(self) -> None:
        from ..models import load_model
        from ..models.base import resolve_device
        from ..normalize import Normalize
        from ..pipeline import default_layer

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
        from .prefix import FrozenPrefix

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

    def _train_key(self, s: D.Sample):
        """Prefix-cache key of a training sample, None when its pixels change per epoch."""
        if self.cfg.augment == "none" or (self.cfg.augment == "fill" and s.copy == 0):
            return ("train", s.index)
        return None

    @staticmethod
    def _val_key(s: D.Sample):
        return ("val", s.index)

    def _train_mode(self) -> None:
        """Training mode for the head and the trained units; frozen units in eval mode
        (their BatchNorm statistics and dropout as at inference); BatchNorm per ``--bn``."""
        self.net.train()
        live = set(self.train_units)
        for name in self.units:
            if name not in live:
                self.net.get_submodule(name).eval()
        H.set_bn_mode(self.net, self.cfg.bn, self.train_units)

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

    # ----------------------------------------------------------------- passes

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
        from ..taps import Taps

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
        from ..pooling import get_pooling
        from ..taps import OUTPUT

        if not self.val_samples:
            return {}
        layers = [OUTPUT] + ([self.eval_layer] if need_desc else [])
        pooled = {self.eval_layer: get_pooling(pool or self.eval_pool).to(self.device)} if need_desc else None
        acts, kept = self._describe(self.val_loader, self.val_samples, layers, pooled=pooled, key=self._val_key)
        if not kept:
            return {}
        y = torch.tensor([self.val_samples[i].label for i in kept])
        out = acts[OUTPUT]
        res = {"val_loss": float(_ce(out, y, self.probs)), "val_acc": float((out.flatten(1).argmax(1) == y)
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

    # ----------------------------------------------------------------- stages

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

    def _snapshot(self, epoch: int, stage: str, opt: torch.optim.Optimizer, it: int) -> Path:
        snap = {
            "format": SNAPSHOT_FORMAT,
            "epoch": epoch,
            "stage": stage,
            "model": H.to_checkpoint({k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                                     self.head_module),
            "optimizer": opt.state_dict(),
            "scheduler": {"kind": self.cfg.schedule, "iteration": it},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "metric": self.metric.state_dict() if self.metric is not None else {},
            "rng": _rng_state(),
            "history": self.history,
            "classes": list(self.classes),
            "base_model": self.cfg.model,
            "head_module": self.head_module,
            "deepfeat_version": __version__,
            "saved": _now(),
        }
        path = snapshot_path(self.run, epoch)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(snap, tmp)
        os.replace(tmp, path)
        if self.cfg.keep_snapshots:
            for old in sorted((self.run / "snapshots").glob("epoch_*.pt"))[:-self.cfg.keep_snapshots]:
                old.unlink(missing_ok=True)
        return path

    def _end_epoch(self, entry: dict, stage: str, opt: torch.optim.Optimizer, it: int, last_of_stage: bool) -> None:
        entry = {k: v for k, v in entry.items() if not k.startswith("_")}
        self.history.append(entry)
        _write_log(self.run, self.history)
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
                loss = _ce(out, y, self.probs)
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

    def _precompute(self, need_before: bool) -> dict[str, torch.Tensor]:
        """The head's input for every sample (first-epoch views) and validation image."""
        from ..pooling import get_pooling

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
        return {"val_loss": float(_ce(out, y, self.probs)), "val_acc": float((out.argmax(1) == y).float().mean())}

    def _before_eval(self) -> None:
        """Off-the-shelf descriptors of the validation images from a freshly loaded base model."""
        from ..models import load_model
        from ..pooling import get_pooling

        base = load_model(self.cfg.model, device=str(self.device))
        pool = {self.eval_layer: get_pooling(self.eval_pool).to(self.device)}
        acts, kept = self._describe(self.val_loader, self.val_samples, [self.eval_layer], net=base.net, pooled=pool)
        self._set_before(self._eval_retrieval(acts[self.eval_layer].numpy(), kept))
        del base

    def _set_before(self, ev: tuple[Any, dict[str, float]]) -> None:
        self.retrieval["before"] = R.summary(ev[0])
        self.retrieval["before_per_class"] = ev[1]
        self._write_retrieval()

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
            loss = _ce(out, yt, self.probs)
            self._step(opt, loss)
            tot_loss += loss.item() * len(yt)
            tot_ok += float((out.detach().flatten(1).argmax(1) == yt).sum())
            tot_n += len(yt)
            self.progress.update(loss.item(), acc=tot_ok / tot_n)
        self.progress.close()
        return ({"epoch": e, "stage": "full", "iters": iters, "images": int(tot_n),
                 "train_loss": tot_loss / max(tot_n, 1), "train_acc": tot_ok / max(tot_n, 1), "lr": lr}, it)

    # ----------------------------------------------------------------- output

    def _write_retrieval(self) -> None:
        d = self._descriptor()
        doc = {"protocol": "every validation image a query; relevant = same class; query excluded",
               "layer": d["layer"], "pooling": d["pooling"], "post": d["post"], "pooling_before": self._pool_spec(),
               "image_size": list(self.data_config.input_size), "n_queries": len(self.val), **self.retrieval}
        if "before" in self.retrieval and "after" in self.retrieval:
            doc["table"] = R.comparison_table(self.retrieval["before"], self.retrieval["after"]).splitlines()
        R.write_json(self.run / "retrieval.json", doc)

    def _descriptor(self) -> dict[str, str]:
        """The run's descriptor: what --eval-retrieval measures and ``extract --model
        finetuned:RUN`` uses without --layer/--pool (recorded in meta.json)."""
        pool = f"gem:p={self.metric.p:.6g}" if self.metric is not None else self._pool_spec()
        d = {"layer": self.eval_layer, "pooling": pool, "post": "l2",
             "chosen_by": "options" if (self.cfg.eval_layer not in ("default", "") or
                                        self.cfg.eval_pool not in ("default", "")) else "default"}
        if self.metric is not None and self.metric.whiten is not None:
            d["whitening"] = "whitening.npz"  # applied with extract --post RUN/whitening.npz
        return d

    def _final_val_acc(self) -> float | None:
        last_val = next((h for h in reversed(self.history) if h.get("val_acc") is not None), None)
        if self.metric is not None and self.metric.refit.get("val_acc") is not None:
            return self.metric.refit["val_acc"]
        return last_val["val_acc"] if last_val else None

    def _write_curves(self) -> None:
        from .curves import write_curves

        try:
            write_curves(self.run, self.history, f"{self.cfg.model} fine-tuned on {Path(self.root).name}")
        except Exception as e:  # a picture must never stop a run
            log.warning("could not draw %s: %s: %s", self.run / "curves.png", type(e).__name__, e)

    def _pool_spec(self) -> str:
        from ..pooling import get_pooling

        return get_pooling(self.eval_pool).spec

    def _save_model(self) -> dict:
        from safetensors.torch import save_file

        from ..models.base import file_sha256

        sd = H.to_checkpoint({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
                             self.head_module)
        path = self.run / "model.safetensors"
        tmp = path.with_name(".model.safetensors.tmp")
        save_file(sd, str(tmp), metadata={"format": META_FORMAT, "head": H.HEAD_NAME})
        os.replace(tmp, path)
        final_acc = self._final_val_acc()
        best = max((h for h in self.history if h.get("val_acc") is not None), key=lambda h: h["val_acc"],
                   default=None)
        base_meta = self.base.meta()
        base_meta.pop("data_config", None)
        meta = {
            "format": META_FORMAT,
            "deepfeat_version": __version__,
            "created": self.created,
            "finished": _now(),
            "base_model": base_meta,
            "classes": list(self.classes),
            "num_classes": len(self.classes),
            "head": {"name": H.HEAD_NAME, "module": self.head_module, **H.head_spec(self.head)},
            "data_config": self.data_config.to_dict(),
            "default_layer": self.eval_layer,
            "descriptor": self._descriptor(),
            "weights": path.name,
            "weights_sha256": file_sha256(path),
            "training": {**self.cfg.to_dict(), "resume": None, "trainable_units": self.train_units,
                         "augmentation": self.aug.to_dict() if self.aug else None,
                         "head_trained_on_precomputed_features": bool(self.head_is_last),
                         "cached_prefix": [self.prefix.names[0], self.prefix.last] if self.prefix else None},
            "data": {"root": self.root, "n_train": len(self.train), "n_val": len(self.val),
                     "n_samples": len(self.samples), "excluded": len(self.excluded), "odd": len(self.odd),
                     "class_counts": self._class_counts(self.train),
                     "balanced_counts": D.balance_counts(self.samples, len(self.classes))},
            "epochs_done": self.history[-1]["epoch"] if self.history else 0,
            "val_accuracy": final_acc,
            "best_val_accuracy": best["val_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "seconds": round(time.perf_counter() - self.t_start + self._seconds_before, 1),
        }
        if self.metric is not None:
            self.metric.save_files(self.run)
            meta["metric_learning"] = self.metric.meta()
        if self.retrieval.get("after"):
            meta["retrieval"] = {k: self.retrieval[k] for k in ("before", "after", "gain", "warning")
                                 if k in self.retrieval}
        _write_json(self.run / "meta.json", meta)
        return meta

    def _class_counts(self, items: list[D.LabelledImage]) -> list[int]:
        c = [0] * len(self.classes)
        for it in items:
            c[it.label] += 1
        return c

    # ----------------------------------------------------------------- main

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
            from .metric import MetricLearner

            self.metric = MetricLearner(self)
        self.total_epochs = cfg.head_epochs + cfg.epochs
        self._seconds_before = 0.0
        prev = R.read_json(self.run / "retrieval.json") if cfg.resume else None
        if prev and prev.get("layer") == self.eval_layer and prev.get("pooling_before", prev.get("pooling")) == self._pool_spec() and \
                prev.get("image_size") == list(self.data_config.input_size) and "before" in prev:
            self.retrieval["before"] = prev["before"]
            self.retrieval["before_per_class"] = prev.get("before_per_class", {})
        start = 0
        if snap is not None:
            if list(snap["classes"]) != list(self.classes) or snap["head_module"] != self.head_module:
                raise UsageError(f"snapshot {self.resumed_from} was made for other classes or another model; "
                                 "resume it in its own run directory")
            sd = H.from_checkpoint(snap["model"], self.head_module, f"snapshot {self.resumed_from}")
            from ..models.weights import fit_state_dict

            fit_state_dict(self.net, sd, f"snapshot {self.resumed_from}")
            if self.metric is not None and snap.get("metric"):
                self.metric.load_state_dict(snap["metric"])
            _set_rng_state(snap["rng"])
            start = int(snap["epoch"])
            self.history = [dict(h) for h in snap["history"]]
            self._seconds_before = sum(float(h.get("seconds") or 0) for h in self.history)
            _write_log(self.run, self.history)
            self.progress.line(f"resuming from {self.resumed_from} (epoch {start} of {self.total_epochs})")
        self._log_plan()
        if cfg.save_augmented and not cfg.resume:
            written = D.save_augmented(self.run / "augmented", self.train, self.classes, self.samples, self.loader,
                                       self.aug, cfg.augment, cfg.seed, epoch=1)
            self.progress.line(f"saved {len(written)} augmented copies to {self.run / 'augmented'}")
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
        if cfg.eval_retrieval:
            if self.metric is not None:
                pool = f"gem:p={self.metric.p:.6g}"
                v = self._val_pass(True, pool=pool)
                if v.get("_eval") is not None:
                    self.retrieval["after_learned_pooling"] = {"pooling": pool, **R.summary(v["_eval"][0])}
                    # the descriptor extract uses (the learned p): what "after" reports
                    self.after_eval = v["_eval"]
                    if self.metric.whiten is not None:
                        desc, kept = v["_desc"]
                        ev = self._eval_retrieval(self.metric.describe_np(desc), kept)
                        self.retrieval["after_learned_whitening"] = {
                            "pooling": pool, "post": self.metric.whitening_chain().spec,
                            "file": str(self.run / "whitening.npz"), **R.summary(ev[0])}
            if self.after_eval is None and "after" not in self.retrieval:
                v = self._val_pass(True)
                self.after_eval = v.get("_eval")
            if self.after_eval is not None:
                self.retrieval["after"] = R.summary(self.after_eval[0])
                self.retrieval["after_per_class"] = self.after_eval[1]
            if "before" in self.retrieval and "after" in self.retrieval:
                b, a = self.retrieval["before"], self.retrieval["after"]
                self.retrieval["gain"] = {"map": a["map"] - b["map"],
                                          **{f"mp@{k}": a["mp_at_k"][k] - b["mp_at_k"][k] for k in a["mp_at_k"]}}
                warning = retrieval_warning(self._final_val_acc(), len(self.classes), b["map"], a["map"],
                                            self._descriptor())
                if warning:
                    log.warning("%s", warning)
                    if self.cfg.progress != "none":
                        self.progress.line(f"warning: {warning}")
                    self.retrieval["warning"] = warning
            self._write_retrieval()
        self.progress.finish()
        self._write_curves()  # with the final numbers
        meta = self._save_model()
        seconds = time.perf_counter() - self.t_start
        return FinetuneResult(
            run_dir=str(self.run), spec=f"finetuned:{self.run}", classes=list(self.classes), n_train=len(self.train),
            n_val=len(self.val), n_samples=len(self.samples), class_counts=meta["data"]["class_counts"],
            balanced_counts=meta["data"]["balanced_counts"], excluded=self.excluded, odd=self.odd,
            history=self.history, val_accuracy=meta["val_accuracy"], seconds=seconds,
            retrieval=dict(self.retrieval) if cfg.eval_retrieval else None, resumed_from=self.resumed_from,
            failures={**self.loader.failures, **self.val_loader.failures},
            warnings=[self.retrieval["warning"]] if self.retrieval.get("warning") else [],
        )

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


def retrieval_warning(val_acc: float | None, n_classes: int, map_before: float, map_after: float,
                      descriptor: dict[str, str] | None = None) -> str | None:
    """The warning of ``--eval-retrieval`` when the classifier learned (final validation
    accuracy at least :data:`ACCURACY_RISE_MIN` above chance, ``1 / n_classes``) but the
    retrieval mAP of the run's descriptor gained less than :data:`RETRIEVAL_GAIN_MIN`;
    None otherwise."""
    if val_acc is None or n_classes < 2:
        return None
    chance = 1.0 / n_classes
    gain = map_after - map_before
    if val_acc - chance < ACCURACY_RISE_MIN or gain >= RETRIEVAL_GAIN_MIN:
        return None
    what = f" ({descriptor['layer']} + {descriptor['pooling']})" if descriptor else ""
    return (f"validation accuracy rose to {100 * val_acc:.1f}% (chance {100 * chance:.1f}%) but retrieval did not: "
            f"the mAP of the descriptor extract uses{what} went from {100 * map_before:.2f} to "
            f"{100 * map_after:.2f} ({100 * gain:+.2f}); the fine-tuning moved the classifier, not the "
            "descriptors (the head separated the training classes before the backbone had to change). Train more "
            "of the backbone at a higher rate (--train-blocks, --lr), train the descriptor itself (--loss "
            "contrastive), or see docs/finetune.md \"Where the gain goes\"")


def _adopt_identity(cfg: FinetuneConfig, saved: dict[str, Any]) -> None:
    """--resume: the data, split and network settings come from the run; a value the
    caller set explicitly to something else is an error."""
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    diffs = []
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
        setattr(cfg, k, saved[k])
    if diffs:
        raise UsageError("--resume keeps the run's data, split and model settings; these differ: "
                         + "; ".join(diffs) + ". Start a new -o RUN_DIR to change them")


def finetune(cfg: FinetuneConfig, on_epoch: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on the labelled images ``cfg.data`` into ``cfg.output``.

    Writes ``classes.txt``, ``train.txt``/``val.txt``, ``check.json``, ``config.json``,
    ``log.csv``/``log.json``, ``snapshots/epoch_NNN.pt``, and at the end
    ``model.safetensors`` + ``meta.json`` (the run is then the model spec
    ``finetuned:RUN_DIR``) and, with ``eval_retrieval``, ``retrieval.json``.
    *on_epoch* is called with each epoch's log entry after its snapshot is written.
    """
    return Finetuner(cfg, on_epoch)()

