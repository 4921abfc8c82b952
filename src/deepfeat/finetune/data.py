"""Labelled image sets for fine-tuning: listing, checking, splitting, balancing, augmenting, loading.

The flow is ``list_labelled`` (class folders or a ``path,label`` CSV) -> ``check_labelled``
(the ``check-images`` verdict per file; unusable files are excluded, never crash
training) -> ``split_labelled`` (per class, seeded) -> ``balance`` (small classes filled
up with augmented copies, large ones kept whole) -> :class:`BatchLoader` (decode at the
model's input size, augment on the fly, batch, in threads).

Augmentation is the classic Keras ``ImageDataGenerator`` set (rotation, width/height
shift, shear, zoom, horizontal flip, ``fill_mode='nearest'``) composed into one affine
transform per sample, drawn from a generator seeded by (seed, epoch, image, copy), so
every view is reproducible and ``--save-augmented`` writes exactly what training sees.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import threading
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DeepfeatError, UsageError
from ..images import walk_images, check_image, decode_image
from ..preprocess import DataConfig, SizePolicy

log = logging.getLogger(__name__)

AUGMENT_MODES = ("fill", "all", "none")


# ---------------------------------------------------------------------------
# Listing and checking
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledImage:
    """One usable training image: its path and its class index."""

    path: str
    label: int


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
        c = [0] * len(self.classes)
        for it in self.items:
            c[it.label] += 1
        return c


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
    from ..images import IMAGE_EXTENSIONS

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


@dataclass(frozen=True)
class Sample:
    """One entry of an epoch: train image *index*, its *label*, and *copy* (0 = the
    image itself, k >= 1 = its k-th augmented fill-up copy)."""

    index: int
    label: int
    copy: int = 0


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


# ---------------------------------------------------------------------------
# Augmentation (Keras ImageDataGenerator semantics)
# ---------------------------------------------------------------------------

FILL_MODES = {"nearest": "border", "reflect": "reflection", "constant": "zeros"}


@dataclass(frozen=True)
class AffineParams:
    """One drawn transform: rotation (degrees), shifts (pixels, rows/cols), shear
    (radians), zoom factors (rows/cols), horizontal flip."""

    theta: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    shear: float = 0.0
    zx: float = 1.0
    zy: float = 1.0
    flip: bool = False


@dataclass(frozen=True)
class Augmentation:
    """The Keras ``ImageDataGenerator`` set, one affine transform per sample.

    ``rotation`` in degrees (``rotation_range``), ``width_shift``/``height_shift`` as
    fractions of the image size, ``shear`` in radians (Keras 1 semantics, the one the
    classic small-data recipe was written for: 0.2 rad ~ 11.5 deg; Keras 2 reads the
    same number as degrees, which is almost no shear), ``zoom`` as the range
    ``[1 - z, 1 + z]`` drawn independently for rows and columns, a horizontal flip with
    probability 1/2, and ``fill`` for points outside the image: ``nearest`` repeats the
    edge pixel as Keras' ``fill_mode='nearest'`` does. Bilinear interpolation, as
    Keras' ``order=1``.
    """

    rotation: float = 10.0
    width_shift: float = 0.2
    height_shift: float = 0.2
    shear: float = 0.2
    zoom: float = 0.2
    horizontal_flip: bool = True
    fill: str = "nearest"

    def __post_init__(self) -> None:
        if self.fill not in FILL_MODES:
            raise UsageError(f"augmentation fill {self.fill!r} unknown; choose {', '.join(FILL_MODES)}")
        for name in ("rotation", "width_shift", "height_shift", "shear", "zoom"):
            if getattr(self, name) < 0:
                raise UsageError(f"augmentation {name} must be >= 0, not {getattr(self, name)}")
        if self.zoom >= 1:
            raise UsageError(f"augmentation zoom must be < 1 (range [1-z, 1+z]), not {self.zoom}")

    def draw(self, rng: np.random.Generator, height: int, width: int) -> AffineParams:
        """Random parameters, drawn in Keras' order (theta, tx, ty, shear, zx, zy, flip)."""
        theta = rng.uniform(-self.rotation, self.rotation) if self.rotation else 0.0
        tx = rng.uniform(-self.height_shift, self.height_shift) * height if self.height_shift else 0.0
        ty = rng.uniform(-self.width_shift, self.width_shift) * width if self.width_shift else 0.0
        shear = rng.uniform(-self.shear, self.shear) if self.shear else 0.0
        if self.zoom:
            zx, zy = rng.uniform(1 - self.zoom, 1 + self.zoom, 2)
        else:
            zx = zy = 1.0
        flip = bool(rng.random() < 0.5) if self.horizontal_flip else False
        return AffineParams(float(theta), float(tx), float(ty), float(shear), float(zx), float(zy), flip)

    def apply(self, pixels: np.ndarray, params: AffineParams) -> np.ndarray:
        """Warp one ``H x W x C`` uint8 image; returns a new uint8 array."""
        return warp_affine(pixels, affine_matrix(params, *pixels.shape[:2]), self.fill, params.flip)

    def to_dict(self) -> dict:
        return {"rotation": self.rotation, "width_shift": self.width_shift, "height_shift": self.height_shift,
                "shear": self.shear, "shear_unit": "radians", "zoom": self.zoom,
                "horizontal_flip": self.horizontal_flip, "fill": self.fill}


def aug_rng(seed: int, epoch: int, index: int, copy: int) -> np.random.Generator:
    """The generator of one sample's transform: a function of (seed, epoch, image, copy) only."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index), int(copy)])


def affine_matrix(p: AffineParams, height: int, width: int) -> np.ndarray:
    """3 x 3 matrix mapping output (row, col, 1) to input (row, col, 1), Keras' composition
    ``rotation @ shift @ shear @ zoom`` about the image centre."""
    t = np.deg2rad(p.theta)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    shift = np.array([[1, 0, p.tx], [0, 1, p.ty], [0, 0, 1]])
    shear = np.array([[1, -np.sin(p.shear), 0], [0, np.cos(p.shear), 0], [0, 0, 1]])
    zoom = np.array([[p.zx, 0, 0], [0, p.zy, 0], [0, 0, 1]])
    m = rot @ shift @ shear @ zoom
    oy, ox = (height - 1) / 2.0, (width - 1) / 2.0
    to_c = np.array([[1, 0, oy], [0, 1, ox], [0, 0, 1]])
    from_c = np.array([[1, 0, -oy], [0, 1, -ox], [0, 0, 1]])
    return to_c @ m @ from_c


def warp_affine(pixels: np.ndarray, matrix: np.ndarray, fill: str = "nearest", flip: bool = False) -> np.ndarray:
    """Resample *pixels* (H x W x C uint8) at ``matrix @ (row, col, 1)`` bilinearly, then
    flip horizontally if asked (Keras flips after the affine transform)."""
    import torch
    import torch.nn.functional as F

    h, w = pixels.shape[:2]
    rr, cc = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    src_r = matrix[0, 0] * rr + matrix[0, 1] * cc + matrix[0, 2]
    src_c = matrix[1, 0] * rr + matrix[1, 1] * cc + matrix[1, 2]
    gx = src_c / max(w - 1, 1) * 2 - 1
    gy = src_r / max(h - 1, 1) * 2 - 1
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1).astype(np.float32))[None]
    img = torch.from_numpy(np.require(pixels, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode=FILL_MODES[fill], align_corners=True)
    out = out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    if flip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def augmented_view(pixels: np.ndarray, aug: Augmentation | None, mode: str, seed: int, epoch: int,
                   sample: Sample) -> np.ndarray:
    """The pixels training sees for *sample* in *epoch*: fill-up copies are always
    augmented (unless mode ``none``), originals only in mode ``all``."""
    if aug is None or mode == "none" or (mode == "fill" and sample.copy == 0):
        return pixels
    rng = aug_rng(seed, epoch, sample.index, sample.copy)
    return aug.apply(pixels, aug.draw(rng, *pixels.shape[:2]))


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


class BatchLoader:
    """Decode (at the model's input size), cache, augment and batch images in threads.

    Batches are prepared ahead by *workers* threads (PIL and torch release the GIL);
    with *cache* the decoded pixels of each image are kept in memory after their first
    decode, so later epochs only augment. An image that fails to decode during
    training is dropped from its batch and recorded in :attr:`failures`, never raised.
    """

    def __init__(self, items: Sequence[LabelledImage], cfg: DataConfig, *, workers: int = 2,
                 cache: bool = True, prefetch: int = 2):
        self.items = list(items)
        self.cfg = cfg
        self.workers = max(1, int(workers))
        self.cache_enabled = cache
        self.prefetch = max(1, int(prefetch))
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self.failures: dict[str, str] = {}

    def pixels(self, index: int) -> np.ndarray:
        px = self._cache.get(index)
        if px is not None:
            return px
        px = decode_image(self.items[index].path, SizePolicy("model"), self.cfg).pixels
        if self.cache_enabled:
            self._cache[index] = px
        return px

    def _build(self, samples: Sequence[Sample], aug: Augmentation | None, mode: str, seed: int,
               epoch: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        xs, ys, kept = [], [], []
        for k, s in enumerate(samples):
            try:
                px = self.pixels(s.index)
            except DeepfeatError as e:
                self._fail(s.index, str(e))
                continue
            except Exception as e:  # a decoder bug is this image's problem only
                self._fail(s.index, f"{type(e).__name__}: {e}")
                continue
            xs.append(augmented_view(px, aug, mode, seed, epoch, s))
            ys.append(s.label)
            kept.append(k)
        if not xs:
            h, w = self.cfg.input_size
            return np.zeros((0, h, w, self.cfg.channels), np.uint8), np.zeros(0, np.int64), []
        return np.stack(xs), np.asarray(ys, dtype=np.int64), kept

    def _fail(self, index: int, reason: str) -> None:
        path = self.items[index].path
        with self._lock:
            if path not in self.failures:
                log.warning("skipping %s during training: %s", path, reason)
            self.failures[path] = reason

    def batches(self, samples: Sequence[Sample], batch_size: int, *, aug: Augmentation | None = None,
                mode: str = "none", seed: int = 0, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray,
                                                                                    list[int]]]:
        """Yield ``(pixels N x H x W x C uint8, labels N, positions in *samples*)`` in order."""
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
        chunks = [list(range(i, min(i + batch_size, len(samples)))) for i in range(0, len(samples), batch_size)]
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="deepfeat-ft-load") as pool:
            pending: deque = deque()
            it = iter(chunks)
            for chunk in it:
                pending.append((chunk, pool.submit(self._build, [samples[i] for i in chunk], aug, mode, seed,
                                                   epoch)))
                if len(pending) >= self.workers + self.prefetch:
                    break
            while pending:
                chunk, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(self._build, [samples[i] for i in nxt], aug, mode, seed,
                                                     epoch)))
                x, y, kept = fut.result()
                yield x, y, [chunk[k] for k in kept]


def cache_fits(n_images: int, cfg: DataConfig, limit_bytes: float = 2 * 1024 ** 3) -> bool:
    """Whether decoded pixels of *n_images* at the model's input size fit in *limit_bytes*."""
    h, w = cfg.input_size
    return n_images * h * w * cfg.channels <= limit_bytes


def save_augmented(folder: str | os.PathLike, train: Sequence[LabelledImage], classes: Sequence[str],
                   samples: Sequence[Sample], loader: BatchLoader, aug: Augmentation | None, mode: str,
                   seed: int, epoch: int = 1) -> list[str]:
    """Write the fill-up copies (as epoch *epoch* sees them) as PNG files
    ``folder/<class>/<stem>_aug<copy>.png`` plus ``folder/list.txt`` (``path label``)."""
    from PIL import Image

    out_dir = Path(folder)
    written, lines = [], []
    for s in samples:
        if s.copy == 0:
            continue
        try:
            px = augmented_view(loader.pixels(s.index), aug, mode, seed, epoch, s)
        except DeepfeatError as e:
            log.warning("cannot save an augmented copy of %s: %s", train[s.index].path, e)
            continue
        d = out_dir / _safe_name(classes[s.label])
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{Path(train[s.index].path).stem}_aug{s.copy}.png"
        Image.fromarray(px[:, :, 0] if px.shape[2] == 1 else px).save(path)
        written.append(str(path))
        lines.append(f"{path.relative_to(out_dir)} {s.label}\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "list.txt").write_text("".join(lines), encoding="utf-8")
    return written


def _safe_name(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "class"


def n_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size) if n else 0


__all__ = [
    "AUGMENT_MODES", "AffineParams", "Augmentation", "BatchLoader", "Excluded", "LabelledImage", "LabelledSet",
    "Sample", "affine_matrix", "aug_rng", "augmented_view", "balance", "balance_counts", "cache_fits",
    "check_labelled", "epoch_order", "list_labelled", "read_split", "save_augmented", "split_labelled",
    "warp_affine", "write_split",
]
