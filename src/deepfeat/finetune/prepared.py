"""The data of a fine-tuning run: the checked, split and balanced labelled images
(:class:`PreparedData`, read back from the run directory on ``--resume``) and the
loaders that decode them at the network's input size (:class:`Loaders`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from deepfeat.data.preprocess import DataConfig
from deepfeat.errors import UsageError
from deepfeat.finetune import data as D
from deepfeat.finetune.config import FinetuneConfig
from deepfeat.finetune.rundir import RunDirectory


@dataclass
class PreparedData:
    """The run's images: ``train``/``val`` split of the checked set under ``root``, the
    balanced training ``samples`` (fill-up copies included) and the ``val_samples``,
    the files left out (``excluded``) or kept with a remark (``odd``), and the
    augmentation (None with ``--augment none``)."""

    root: str
    classes: list[str]
    train: list[D.LabelledImage]
    val: list[D.LabelledImage]
    excluded: list[dict]
    odd: list[dict]
    samples: list[D.Sample]
    val_samples: list[D.Sample]
    aug: D.Augmentation | None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def plan(self) -> str:
        """The data part of the run's opening line."""
        counts = D.balance_counts(self.samples, self.n_classes)
        return (f"{self.n_classes} classes, {len(self.train)} train / {len(self.val)} val images "
                f"({len(self.excluded)} excluded), {len(self.samples)} samples per epoch after balancing "
                f"(min {min(counts)}, max {max(counts)} per class)")


def workers(cfg: FinetuneConfig) -> int:
    """Decode threads: ``--workers``, else up to 4."""
    return cfg.workers or min(4, max(1, os.cpu_count() or 1))


def prepare_data(cfg: FinetuneConfig, run: RunDirectory) -> PreparedData:
    """Check and split ``cfg.data`` (seeded) and write the split into *run*; on ``--resume``
    read the split the run wrote instead. Then balance the training images."""
    if cfg.resume and run.has_split():
        check = run.read_check()
        root = check["root"]
        classes = run.read_classes()
        train = run.read_split("train", root, len(classes))
        val = run.read_split("val", root, len(classes))
        excluded, odd = check["excluded"], check["odd"]
    else:
        ds = D.check_labelled(cfg.data, exclude_odd=cfg.exclude_odd, workers=max(2, workers(cfg)))
        root, classes = ds.root, ds.classes
        train, val = D.split_labelled(ds, cfg.val_frac, cfg.seed)
        excluded = [e.to_dict() for e in ds.excluded]
        odd = [e.to_dict() for e in ds.odd]
        run.write_split(classes, train, val, {"root": root, "source": str(cfg.data), "excluded": excluded,
                                              "odd": odd, "counts": dict(zip(classes, ds.counts()))})
    if not train:
        raise UsageError("no training images left after the split")
    return PreparedData(
        root=root, classes=classes, train=train, val=val, excluded=excluded, odd=odd,
        samples=D.balance(train, len(classes), cfg.per_class),
        val_samples=[D.Sample(i, it.label, 0) for i, it in enumerate(val)],
        aug=D.Augmentation() if cfg.augment != "none" else None,
    )


@dataclass
class Loaders:
    """The batch loaders of the training and validation images."""

    train: D.BatchLoader
    val: D.BatchLoader

    @classmethod
    def make(cls, cfg: FinetuneConfig, data: PreparedData, dc: DataConfig) -> Loaders:
        """Loaders at the input size *dc*; decoded pixels cached in memory per
        ``--cache-images`` (``auto``: when they fit)."""
        n_img = len(data.train) + len(data.val)
        cache = cfg.cache_images == "on" or (cfg.cache_images == "auto" and D.cache_fits(n_img, dc))
        return cls(D.BatchLoader(data.train, dc, workers=workers(cfg), cache=cache),
                   D.BatchLoader(data.val, dc, workers=workers(cfg), cache=cache))

    @property
    def failures(self) -> dict[str, str]:
        return {**self.train.failures, **self.val.failures}
