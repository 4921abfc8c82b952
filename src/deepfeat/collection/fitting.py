"""``deepfeat fit-classifier`` as one call: labelled images or a store -> descriptors -> a fitted,
saved :class:`~deepfeat.collection.classifier.Classifier` folder with its confusion-matrix picture."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from deepfeat.backends.embedder import copy_recipe_files, descriptor_recipe
from deepfeat.collection.classifier import Classifier, fit_classifier
from deepfeat.collection.labelled import is_store, labelled
from deepfeat.errors import DeepfeatError

log = logging.getLogger(__name__)


def fit_from(source: str | os.PathLike, output: str | os.PathLike, *, gt: str = "folders",
             store_dir: str | os.PathLike | None = None, extract_options: dict[str, Any] | None = None,
             feature: str | None = None, method: str = "auto", threshold: float | str = "auto",
             folds: int = 5, seed: int = 0, figure: bool = True) -> Classifier:
    """Fit a classifier on *source* (class folders, a ``path,label`` CSV, or a store with *gt*) and
    save it in *output*. Images are extracted into *store_dir* (default ``OUTPUT/train-store``)
    with *extract_options* (ExtractConfig fields: model, layers, pooling, post...)."""
    output = Path(output)
    if is_store(output):
        from deepfeat.errors import UsageError

        raise UsageError(f"{output} is a feature store; give the classifier its own folder")
    if store_dir is None and not is_store(source):
        store_dir = output / "train-store"
    data = labelled(source, gt=gt, store_dir=store_dir, extract_options=extract_options, feature=feature)
    clf = fit_classifier(data.X, data.y, data.classes, descriptor_recipe(data.store.meta, data.feature),
                         method=method, threshold=threshold, folds=folds, seed=seed,
                         source=os.fspath(source))
    clf.meta["training"]["store"] = os.fspath(data.store.path)
    output.mkdir(parents=True, exist_ok=True)
    copy_recipe_files(data.store.path, output)
    clf.save(output)
    if figure:
        try:
            from deepfeat.collection.figures import confusion_png

            cv = clf.meta["cv"]
            confusion_png(cv["confusion"], clf.classes, output / "confusion.png",
                          title=f"{clf.method} {clf.meta['params']}: {cv['folds']}-fold CV accuracy "
                                f"{cv['accuracy']:.1%}")
        except (DeepfeatError, OSError, ValueError) as e:  # the picture is a convenience; the classifier is saved
            log.warning("no confusion.png: %s", e)
    return clf
