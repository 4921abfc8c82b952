"""Loading fine-tuning samples: decode at the model's input size, cache, augment and batch in
threads (:class:`BatchLoader`); writing the augmented fill-up copies (``--save-augmented``)."""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deepfeat.data.images import decode_image
from deepfeat.data.preprocess import DataConfig, SizePolicy
from deepfeat.errors import DeepfeatError, UsageError
from deepfeat.finetune.augment import Augmentation, augmented_view

if TYPE_CHECKING:
    from deepfeat.finetune.samples import LabelledImage, Sample

log = logging.getLogger(__name__)


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
