"""Thumbnails of stored images, made on demand and kept in a small in-memory LRU."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image, ImageOps

from deepfeat.data.images import open_image

THUMB_MIN, THUMB_MAX = 16, 1024


def make_thumbnail(path: str, size: int, max_pixels: int | None) -> bytes:
    """A JPEG whose longer side is at most *size*, upright (EXIF), RGB on white.

    JPEGs are draft-decoded near the target size, so a thumbnail of a large photo
    costs a fraction of a full decode. Raises :class:`~deepfeat.errors.ImageError`."""
    img = open_image(path, max_pixels)
    try:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img)
        img.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        img = img.convert("RGB")
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85, optimize=True)
        return out.getvalue()
    except OSError as e:
        from deepfeat.errors import ImageError

        raise ImageError(f"cannot make a thumbnail: {e}") from None
    finally:
        img.close()


class ThumbnailCache:
    """Thread-safe LRU of encoded thumbnails, bounded by total bytes."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            data = self._data.get(key)
            if data is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            self._data[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._data.popitem(last=False)
                self._bytes -= len(dropped)

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._data), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses}
