"""Labelled images for :func:`~deepfeat.collection.classifier.fit_classifier`: class folders, a CSV
of ``path,label`` rows, or a feature store with a ground truth (``folders``, ``groups:FILE.csv``,
``ukbench``: the classes are the ground truth's groups). Images that are not in a store yet are
extracted into one first (:func:`deepfeat.pipeline.extract`), so the classifier carries that
store's descriptor recipe."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.errors import FormatError, UsageError

log = logging.getLogger(__name__)


@dataclass
class Labelled:
    """Descriptors and their classes: row i of ``X`` is ``paths[i]``, of class ``classes[y[i]]``."""

    X: np.ndarray
    y: np.ndarray
    classes: list[str]
    paths: list[str]
    store: Any  # the FeatureStore they came from
    feature: str


def is_store(path: str | os.PathLike) -> bool:
    return (Path(path) / "meta.json").is_file()


def read_label_csv(csv_path: str | os.PathLike) -> list[tuple[str, str]]:
    """``path,label`` rows (an optional header; relative paths are relative to the CSV's folder)."""
    csv_path = Path(csv_path)
    rows: list[tuple[str, str]] = []
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if lineno == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise FormatError(f"{csv_path}:{lineno}: expected 'path,label', got {','.join(row)!r}")
                p = Path(row[0].strip())
                rows.append((os.fspath(p if p.is_absolute() else csv_path.parent / p), row[1].strip()))
    except UnicodeDecodeError as e:
        raise FormatError(f"{csv_path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    if not rows:
        raise FormatError(f"{csv_path}: no 'path,label' rows")
    return rows


def folder_labels(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(image, class) pairs of a folder with one sub-folder per class (images found recursively)."""
    from deepfeat.data.images import discover

    root = Path(root)
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out.extend((path, sub.name) for path in discover([sub]))
    loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        log.warning("%d files lie directly in %s, not in a class folder: left out (e.g. %s)",
                    len(loose), root, loose[0].name)
    if len({c for _, c in out}) < 2:
        raise UsageError(f"{root}: expected one sub-folder of images per class, found "
                         f"{len({c for _, c in out})} class folder(s) with images")
    return out


def labelled_pairs(source: str | os.PathLike) -> list[tuple[str, str]]:
    """(image, class) pairs from class folders or a ``path,label`` CSV."""
    p = Path(source)
    if p.is_dir():
        return folder_labels(p)
    if p.is_file() and p.suffix.lower() in (".csv", ".txt"):
        return read_label_csv(p)
    raise UsageError(f"{source}: expected a folder of class folders, a path,label CSV or a feature store")


def _key(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


def from_pairs(store, pairs: Sequence[tuple[str, str]], feature: str | None = None) -> Labelled:
    """Match (image, class) pairs to the rows of *store* by path; images that failed to extract
    are left out with a warning."""
    feature = store.feature_name(feature)
    X = store.vectors(feature)
    rows = {_key(p): i for i, p in enumerate(store.paths)}
    classes = sorted({c for _, c in pairs})
    keep, y, paths, missing = [], [], [], []
    for path, c in pairs:
        i = rows.get(_key(path))
        if i is None:
            missing.append(path)
            continue
        keep.append(i)
        y.append(classes.index(c))
        paths.append(store.paths[i])
    if missing:
        log.warning("%d labelled images have no features (unreadable or not in the store), left out: %s",
                    len(missing), ", ".join(missing[:3]))
    if not keep:
        raise UsageError(f"none of the {len(pairs)} labelled images is in the store {store.path}")
    return Labelled(X[np.asarray(keep)], np.asarray(y, np.int64), classes, paths, store, feature)


def from_store_gt(store, gt_spec: str, feature: str | None = None) -> Labelled:
    """Classes from a ground truth of the store's images: ``folders`` (the parent folder's name),
    ``groups:FILE.csv`` or any other ``--gt`` whose queries form groups (named after a member)."""
    feature = store.feature_name(feature)
    if gt_spec == "folders":
        pairs = [(p, Path(p).parent.name or Path(p).parent.as_posix()) for p in store.paths]
        if len({c for _, c in pairs}) < 2:
            raise UsageError(f"{store.path}: --gt folders needs images in at least two folders")
        return from_pairs(store, pairs, feature)
    from deepfeat.evaluate import parse_gt_spec

    gts = parse_gt_spec(gt_spec, store.paths)
    group_of: dict[int, str] = {}
    for q in gts[0].queries:
        members = sorted(set(q.relevant) | {q.index})
        name = Path(store.paths[members[0]]).stem
        for m in members:
            group_of.setdefault(m, name)
    pairs = [(store.paths[i], g) for i, g in sorted(group_of.items())]
    return from_pairs(store, pairs, feature)


def labelled(source: str | os.PathLike, *, gt: str = "folders", store_dir: str | os.PathLike | None = None,
             extract_options: dict[str, Any] | None = None, feature: str | None = None) -> Labelled:
    """Labelled descriptors from a store (+ *gt*) or from class folders / a CSV, extracted first
    into *store_dir* (resumed when it is already there)."""
    from deepfeat.store import FeatureStore

    if is_store(source):
        return from_store_gt(FeatureStore(source), gt, feature)
    pairs = labelled_pairs(source)
    if store_dir is None:
        raise UsageError("images to fit on must be extracted into a store first: give a store folder")
    from deepfeat.pipeline import ExtractConfig, extract

    opts = dict(extract_options or {})
    opts.setdefault("progress", "none")
    cfg = ExtractConfig(inputs=[p for p, _ in pairs], output=os.fspath(store_dir),
                        resume=is_store(store_dir), **opts)
    report = extract(cfg)
    log.info("extracted %d images (%d failed) in %.1fs into %s", report.ok, report.failed, report.seconds, store_dir)
    return from_pairs(FeatureStore(store_dir), pairs, feature)
