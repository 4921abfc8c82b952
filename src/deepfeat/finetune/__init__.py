"""Fine-tuning a deepfeat model on the user's own labelled images.

``finetune(FinetuneConfig(data="flowers/", output="runs/flowers"))`` checks the
images, splits them per class (seeded), balances small classes with augmented copies,
replaces the classifier by a new head for the user's classes, trains head-only then
end to end with snapshots, and writes a run directory that is itself a model spec:
``finetuned:runs/flowers``. See ``docs/finetune.md``.

Modules: the labelled images :mod:`.data` (with :mod:`.augment`, :mod:`.loader`); the
network :mod:`.heads` and :mod:`.prefix`; the settings :mod:`.config`; the run
:mod:`.train` (:func:`finetune`), put together from :mod:`.rundir` (the run directory and
its files, snapshots in :mod:`.snapshots`), :mod:`.prepared` (the data and loaders),
:mod:`.network` (the network being trained), :mod:`.passes` (forward passes that train
nothing), :mod:`.trainer` (the two stages, over the state of :mod:`.state`, with
:mod:`.schedule` and :mod:`.losses`), :mod:`.progress` and :mod:`.report` (retrieval,
``meta.json``, the result); metric learning :mod:`.metric` and :mod:`.whitening`;
:mod:`.retrieval` (before/after mAP), :mod:`.descriptors`, :mod:`.curves`.
Exports are resolved lazily, so importing the package costs nothing until a name is used.
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
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
