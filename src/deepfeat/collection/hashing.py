"""Exact duplicates: the same bytes (content hash) or the same decoded pixels.

Files are hashed only where it can matter: by bytes, only files whose size is shared
with another file (fdupes' and dupeguru's first pass); by pixels, only the rows the
caller names (those whose global descriptors are nearly identical, since identical
pixels give identical descriptors), decoded at full resolution with the EXIF
orientation applied (:func:`deepfeat.data.images.decode_image`), so a PNG saved from a
JPEG, or a copy with its metadata stripped, hashes the same.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Sequence

from deepfeat.data.images import decode_image
from deepfeat.data.sources import file_sha256
from deepfeat.errors import ImageError

log = logging.getLogger(__name__)


def pixel_sha256(path: str | os.PathLike) -> str:
    """The sha256 of an image's decoded pixels (RGB, EXIF orientation applied) and its size."""
    img = decode_image(path)
    h = hashlib.sha256(f"{img.width}x{img.height}x{img.pixels.shape[-1] if img.pixels.ndim == 3 else 1}:".encode())
    h.update(img.pixels.tobytes())
    return h.hexdigest()


def _pairs_of_equal(keys: dict[int, str]) -> list[tuple[int, int]]:
    """(first, other) pairs of the rows sharing a key: each set of equal rows joined as a star."""
    first: dict[str, int] = {}
    pairs = []
    for row in sorted(keys):
        k = keys[row]
        if k in first:
            pairs.append((first[k], row))
        else:
            first[k] = row
    return pairs


def same_bytes(files: Sequence[str], hashes: dict[int, str] | None = None) -> tuple[list[tuple[int, int]], dict[int, str]]:
    """Pairs of rows of *files* with identical bytes, and the sha256 of every file hashed.

    Only files whose size is shared are read. *hashes* (row -> sha256) are reused and
    filled in. Files that cannot be read are left out with a warning."""
    hashes = {} if hashes is None else hashes
    by_size: dict[int, list[int]] = {}
    for row, f in enumerate(files):
        try:
            by_size.setdefault(os.stat(f).st_size, []).append(row)
        except OSError as e:
            log.warning("cannot stat %s: %s", f, e.strerror or e)
    keys = {}
    for rows in by_size.values():
        if len(rows) < 2:
            continue
        for row in rows:
            try:
                if row not in hashes:
                    hashes[row] = file_sha256(files[row])
                keys[row] = hashes[row]
            except OSError as e:
                log.warning("cannot read %s: %s", files[row], e.strerror or e)
    return _pairs_of_equal(keys), hashes


def same_pixels(files: Sequence[str], rows: Iterable[int]) -> list[tuple[int, int]]:
    """Pairs among *rows* of *files* whose decoded pixels are identical."""
    keys = {}
    for row in sorted({int(r) for r in rows}):
        try:
            keys[row] = pixel_sha256(files[row])
        except (ImageError, OSError) as e:
            log.warning("cannot decode %s: %s", files[row], e)
    return _pairs_of_equal(keys)
