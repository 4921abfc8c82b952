"""Labelled image sets for fine-tuning: listing, checking, splitting, balancing.

The flow is ``list_labelled`` (class folders or a ``path,label`` CSV) -> ``check_labelled``
(the ``check-images`` verdict per file; unusable files are excluded, never crash
training) -> ``split_labelled`` (per class, seeded) -> ``balance`` (small classes filled
up with augmented copies, large ones kept whole) -> :class:`BatchLoader` (decode at the
model's input size, augment on the fly, batch, in threads).

The augmentation (Keras ``ImageDataGenerator`` semantics) is :mod:`deepfeat.finetune.augment`,
the loading :mod:`deepfeat.finetune.loader`; the names a run uses are re-exported here.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepfeat.data.images import check_image, walk_images
from deepfeat.errors import UsageError
from deepfeat.finetune.augment import AUGMENT_MODES, AffineParams, Augmentation, aug_rng
from deepfeat.finetune.loader import BatchLoader, cache_fits, save_augmented
from deepfeat.finetune.samples import LabelledImage, Sample

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Listing and checking
# ---------------------------------------------------------------------------


@dataclass
class Excluded:
    """A file left out of training, and why (``status`` is ``error`` or ``odd``)."""

    path: str
    reason: str
    status: str = "error"

    def to_dict(self) -> dict:
        return {"path": self.path, "status": self.status, "reason": self.reason}


@dataclass
class LabelledSet:
    """The usable images of a labelled set, its classes, and what was left out.

    ``root`` is the folder that relative paths in split files are resolved against:
    the data folder, or the folder of the CSV file.
    """

    root: str
    classes: list[str]
    items: list[LabelledImage]
    excluded: list[Excluded] = field(default_factory=list)
    odd: list[Excluded] = field(default_factory=list)  # usable but odd (kept unless exclude_odd)

    def counts(self) -> list[int]:
        return balance_counts(self.items, len(self.classes))


def _read_csv(path: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise UsageError(f"{path}:{n}: expected 'path,label', got {','.join(row)!r}")
            p, label = row[0].strip(), row[1].strip()
            if n == 1 and p.lower() in ("path", "file", "filename", "image") and label.lower() in (
                    "label", "class", "category"):
                continue  # header
            if not p or not label:
                raise UsageError(f"{path}:{n}: empty path or label")
            rows.append((p, label))
    if not rows:
        raise UsageError(f"{path} lists no images (expected rows 'path,label')")
    return rows


def list_labelled(source: str | os.PathLike) -> tuple[str, list[str], list[tuple[str, str]], list[Excluded]]:
    """Find the labelled images of *source*: a folder with one sub-folder per class
    (images found recursively inside each, sorted), or a CSV file of ``path,label``
    rows (optional header; relative paths are relative to the CSV's folder).

    Returns (root, sorted class names, [(path, class name)], files outside any class).
    """
    src = Path(source)
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise UsageError(f"{src} is a file but not a .csv; give a folder with one sub-folder per class "
                             "or a CSV file of 'path,label' rows")
        root = src.resolve().parent
        pairs = []
        for p, label in _read_csv(src):
            q = Path(p)
            pairs.append((os.path.normpath(q if q.is_absolute() else root / q), label))
        classes = sorted({label for _, label in pairs})
        return str(root), classes, pairs, []
    if not src.is_dir():
        raise UsageError(f"data not found: {src} (give a folder with one sub-folder per class, or a CSV file)")
    root = src.resolve()
    pairs, stray = [], []
    classes = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=True):
            found = list(walk_images(Path(entry.path)))
            if found:
                classes.append(entry.name)
                pairs.extend((os.path.normpath(p), entry.name) for p in found)
            else:
                log.warning("class folder %s holds no images; ignored", entry.path)
        elif Path(entry.name).suffix.lower() in _image_exts():
            stray.append(Excluded(os.path.normpath(entry.path), "not inside a class folder", "error"))
    if not classes:
        raise UsageError(f"{src} has no class sub-folders with images; the layout is DATA/<class>/<image>")
    return str(root), classes, pairs, stray


def _image_exts() -> frozenset[str]:
    from deepfeat.data.images import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def check_labelled(source: str | os.PathLike, *, exclude_odd: bool = False, workers: int = 4,
                   min_per_class: int = 1) -> LabelledSet:
    """List *source* and check every file with the ``check-images`` logic.

    Unusable files (empty, truncated, not an image, bad CRC, decompression bomb...)
    are excluded with their reason; odd but usable ones (CMYK, 16-bit, grayscale,
    EXIF-rotated...) are kept and listed, or excluded too with *exclude_odd*. Classes
    left with fewer than *min_per_class* images are an error.
    """
    root, classes, pairs, stray = list_labelled(source)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        checks = list(pool.map(lambda pl: check_image(pl[0]), pairs))
    index = {c: i for i, c in enumerate(classes)}
    items, excluded, odd = [], list(stray), []
    for (path, label), chk in zip(pairs, checks):
        if chk.status == "error":
            excluded.append(Excluded(path, "; ".join(chk.problems) or "unreadable", "error"))
            continue
        if chk.status == "warning":
            e = Excluded(path, "; ".join(chk.problems), "odd")
            if exclude_odd:
                excluded.append(e)
                continue
            odd.append(e)
        items.append(LabelledImage(path, index[label]))
    ds = LabelledSet(root, classes, items, excluded, odd)
    counts = ds.counts()
    small = [f"{c} ({n})" for c, n in zip(classes, counts) if n < min_per_class]
    if small:
        raise UsageError(f"class(es) with fewer than {min_per_class} usable image(s): {', '.join(small)}; "
                         "add images or remove the class folder")
    if len(classes) < 2:
        raise UsageError(f"fine-tuning a classifier needs at least 2 classes, found {len(classes)}: {classes}")
    return ds


# ---------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------


def class_seed(seed: int, class_name: str) -> list[int]:
    """Seed material for one class's shuffle: independent of the other classes present."""
    return [int(seed) & 0xFFFFFFFF, zlib.crc32(class_name.encode("utf-8"))]


def split_labelled(ds: LabelledSet, val_frac: float = 0.4, seed: int = 0) -> tuple[list[LabelledImage],
                                                                                      list[LabelledImage]]:
    """Per class, a seeded shuffle cut into train and val (``round(n * val_frac)`` val
    images, at least one of each when the class has two or more and ``val_frac > 0``).

    The shuffle of a class depends only on the seed, the class name and its (sorted)
    files, so the same data and seed always give the same split.
    """
    if not 0 <= val_frac < 1:
        raise UsageError(f"--val-frac must be in [0, 1), not {val_frac}")
    train, val = [], []
    for label, name in enumerate(ds.classes):
        members = sorted((it for it in ds.items if it.label == label), key=lambda it: it.path)
        n = len(members)
        order = np.random.default_rng(class_seed(seed, name)).permutation(n)
        n_val = round(n * val_frac)
        if val_frac > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        else:
            n_val = 0 if n < 2 else n_val
        shuffled = [members[i] for i in order]
        val.extend(shuffled[:n_val])
        train.extend(shuffled[n_val:])
    return train, val


def _rel(path: str, root: str) -> str:
    try:
        rel = os.path.relpath(path, root)
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith("..") else rel


def write_split(path: str | os.PathLike, items: Sequence[LabelledImage], root: str) -> None:
    """One ``path label`` line per image (label = class index, Caffe ``ImageData`` style);
    paths relative to *root* when they are inside it."""
    lines = [f"{_rel(it.path, root)} {it.label}\n" for it in items]
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)


def read_split(path: str | os.PathLike, root: str, n_classes: int | None = None) -> list[LabelledImage]:
    """Read a split file written by :func:`write_split` (or by hand: ``path label`` lines)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"split file not found: {p}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.rstrip().rpartition(" ")
        try:
            lab = int(label)
        except ValueError:
            raise UsageError(f"{p}:{n}: expected 'path label_index', got {line!r}") from None
        if lab < 0 or (n_classes is not None and lab >= n_classes):
            raise UsageError(f"{p}:{n}: label {lab} out of range for {n_classes} classes")
        q = Path(name)
        out.append(LabelledImage(os.path.normpath(q if q.is_absolute() else Path(root) / q), lab))
    return out


# ---------------------------------------------------------------------------
# Balance
# ---------------------------------------------------------------------------


def balance(train: Sequence[LabelledImage], n_classes: int, per_class: int = 0) -> list[Sample]:
    """Every train image once, plus augmented copies filling each class with fewer than
    *per_class* images up to *per_class* (copies cycle over the class's images in
    split order). Larger classes are not cut. ``per_class=0``: no filling."""
    if per_class < 0:
        raise UsageError(f"--per-class must be 0 or more, not {per_class}")
    by_class: list[list[int]] = [[] for _ in range(n_classes)]
    for i, it in enumerate(train):
        by_class[it.label].append(i)
    out = [Sample(i, it.label, 0) for i, it in enumerate(train)]
    for label, members in enumerate(by_class):
        n = len(members)
        if n == 0 or n >= per_class:
            continue
        for j in range(per_class - n):
            out.append(Sample(members[j % n], label, j // n + 1))
    return out


def balance_counts(samples: Sequence[Sample], n_classes: int) -> list[int]:
    """How many of *samples* (anything with a ``label``) each class has."""
    c = [0] * n_classes
    for s in samples:
        c[s.label] += 1
    return c


def epoch_order(n: int, seed: int, stage: str, epoch: int, length: int | None = None) -> np.ndarray:
    """The seeded order of an epoch's samples; with *length*, permutations are
    concatenated until it is reached (``--iters-per-epoch``)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(stage.encode()), int(epoch)])
    if length is None:
        return rng.permutation(n)
    parts, total = [], 0
    while total < length:
        parts.append(rng.permutation(n))
        total += n
    return np.concatenate(parts)[:length]


def n_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size) if n else 0


__all__ = [
    "AUGMENT_MODES", "AffineParams", "Augmentation", "BatchLoader", "Excluded", "LabelledImage", "LabelledSet",
    "Sample", "aug_rng", "balance", "balance_counts", "cache_fits", "check_labelled", "epoch_order",
    "list_labelled", "n_batches", "read_split", "save_augmented", "split_labelled", "write_split",
]
