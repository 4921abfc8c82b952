"""Fine-tuning a deepfeat model on the user's own labelled images.

``finetune(FinetuneConfig(data="flowers/", output="runs/flowers"))`` checks the
images, splits them per class (seeded), balances small classes with augmented copies,
replaces the classifier by a new head for the user's classes, trains head-only then
end to end with snapshots, and writes a run directory that is itself a model spec:
``finetuned:runs/flowers``. See ``docs/finetune.md``.

Modules: :mod:`.data` (listing, check, split, balance, augmentation, loading),
:mod:`.heads` (new head, trainable units, parameter groups, BatchNorm),
:mod:`.config` (the settings and their checks), :mod:`.train` (the run, put together from
:mod:`.prepare`, :mod:`.passes`, :mod:`.stages`, :mod:`.snapshots`, :mod:`.report`, with
:mod:`.schedule`, :mod:`.losses` and :mod:`.progress`), :mod:`.retrieval` (before/after mAP),
:mod:`.metric` (contrastive or triplet loss with hard negatives; :mod:`.whitening`).
Exports are resolved lazily so that ``deepfeat.models.finetuned`` can import :mod:`.heads`
without pulling in the rest.
"""

from __future__ import annotations

from deepfeat.lazy import lazy_exports

_EXPORTS = {
    "FinetuneConfig": "config",
    "FinetuneResult": "config",
    "finetune": "train",
    "load_snapshot": "snapshots",
    "latest_snapshot": "snapshots",
    "META_FORMAT": "report",
    "Augmentation": "data",
    "LabelledImage": "data",
    "LabelledSet": "data",
    "Sample": "data",
    "balance": "data",
    "balance_counts": "data",
    "check_labelled": "data",
    "list_labelled": "data",
    "read_split": "data",
    "split_labelled": "data",
    "write_split": "data",
    "HEAD_NAME": "heads",
    "backbone_units": "heads",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
