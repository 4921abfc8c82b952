"""Finding and decoding images, robustly.

:func:`discover` turns folders (recursive), files, glob patterns and ``@list.txt``
files into one ordered, de-duplicated list of paths. :func:`decode_image` opens one
image and returns an RGB (or L) uint8 array, resized by a size policy, handling the
odd cases real collections contain: EXIF orientation, CMYK, 16-bit, palette with
transparency, LA/RGBA, and JPEG draft decoding at reduced resolution when the target
is smaller than the file (PIL decodes the JPEG at 1/2, 1/4 or 1/8 scale).
Problems are raised as :class:`~deepfeat.errors.ImageError` with a short reason,
never as a raw PIL traceback.
"""

from __future__ import annotations

import glob
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deepfeat.data.preprocess import PIL_MAX_PIXELS, DataConfig, SizePolicy, draft_request, resize_image, target_size
from deepfeat.errors import ImageError, UsageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)

#: Refuse images with more pixels than this (decompression bombs); PIL's default is 89M.
DEFAULT_MAX_PIXELS = PIL_MAX_PIXELS


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def walk_images(folder: Path) -> Iterator[str]:
    """Image files below *folder*, recursively, sorted, hidden files skipped. Symbolic links
    to folders are followed, each real folder once (a link loop ends there)."""
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(files):
            if not name.startswith(".") and is_image_name(name):
                yield os.path.join(root, name)


def discover(inputs: Iterable[str | os.PathLike], *, all_files: bool = False) -> list[str]:
    """Expand inputs into an ordered list of image paths.

    Each input is a folder (walked recursively, sorted, hidden files skipped), a file,
    a glob pattern (``photos/**/*.jpg``), or ``@list.txt`` (one path per line,
    relative paths resolved against the list's folder, ``#`` comments allowed).
    Files named explicitly are kept whatever their extension (so that a broken or
    mis-named file is reported, not silently dropped); folder and glob matches are
    filtered by image extension unless *all_files*. Duplicates are removed, first
    occurrence wins. A missing input raises :class:`UsageError`.
    """
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    for item in inputs:
        item = os.fspath(item)
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise UsageError(f"list file not found: {listing}")
            base = listing.parent
            try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the first path
                text = listing.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError:
                raise UsageError(f"{listing} is not a text file (a list has one image path per line, UTF-8); "
                                 f"to use an image, give it without the @") from None
            for line in text.splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                p = Path(line)
                add(os.path.normpath(p if p.is_absolute() else base / p))
            continue
        p = Path(item)
        if p.is_dir():
            for f in walk_images(p):
                add(os.path.normpath(f))
        elif p.is_file():
            add(os.path.normpath(p))
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            for m in matches:
                if os.path.isfile(m) and (all_files or is_image_name(m)):
                    add(os.path.normpath(m))
                elif os.path.isdir(m):
                    for f in walk_images(Path(m)):
                        add(os.path.normpath(f))
        else:
            raise UsageError(f"input not found: {item}")
    return out


def printable_path(path: str) -> str:
    """*path* as valid UTF-8 text. Python hands file names that are not UTF-8 over with
    their odd bytes as surrogates, which no UTF-8 file, table or terminal can hold; here
    they become ``\\xNN`` escapes (the name is reported, see :func:`file_problem`)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def _unescape(path: str) -> bytes:
    return re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), os.fsencode(path))


def file_problem(path: str) -> str | None:
    """Why *path* cannot be read as an image file before even opening it, or None:
    missing, a link loop, not a regular file (a FIFO would block a reader forever, a
    device such as ``/dev/zero`` would never end), or a name that is not UTF-8."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not os.path.lexists(path) and "\\x" in path and os.path.lexists(_unescape(path)):
            return "the file name is not valid UTF-8 (shown with \\xNN escapes); rename the file to extract it"
        return "file not found" if not os.path.lexists(path) else "broken symbolic link"
    except OSError as e:
        return f"cannot read file: {e.strerror or e}"
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket"
        return f"not a regular file ({kind})"
    if printable_path(path) != path:
        return "the file name is not valid UTF-8 (shown with \\xNN escapes); rename the file to extract it"
    return None


@dataclass
class DecodedImage:
    """A decoded image: pixels ready for the network plus what we learned on the way."""

    pixels: np.ndarray  # H x W x C uint8 (C = 3 for RGB, 1 for L)
    width: int  # original width, after EXIF orientation
    height: int  # original height, after EXIF orientation
    notes: tuple[str, ...] = ()  # odd-but-handled facts: "cmyk", "16-bit", "exif-rotated", ...


def _to_mode(img: Image.Image, mode: str, notes: list[str]) -> Image.Image:
    """Convert any PIL mode to RGB or L with sensible handling of the odd ones."""
    src = img.mode
    if src in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        notes.append("16-bit" if src.startswith("I;16") else "32-bit-int")
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            hi = float(arr.max()) if arr.size else 0.0
            # 16-bit data scaled to 8 bits by its nominal range, not clipped
            denom = 65535.0 if hi > 255 or src.startswith("I;16") else 255.0
            arr = np.clip(arr.astype(np.float64) * (255.0 / denom), 0, 255).round().astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    elif src == "F":
        notes.append("float")
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    elif src == "CMYK":
        notes.append("cmyk")
    elif src == "P" and "transparency" in img.info:
        notes.append("palette-alpha")
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        if src not in ("P",):
            notes.append("alpha")
        # composite on white: transparent regions are usually background
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    if mode == "L":
        return img.convert("L")
    return img.convert("RGB") if img.mode != "RGB" else img


def open_image(path: str | os.PathLike | BinaryIO, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (lazily) an image file or file object, turning every failure into an :class:`ImageError`."""
    if hasattr(path, "read"):
        if hasattr(path, "getbuffer") and len(path.getbuffer()) == 0:  # type: ignore[union-attr]
            raise ImageError("empty file (0 bytes)")
    else:
        path = os.fspath(path)
        problem = file_problem(path)
        if problem:
            raise ImageError(problem)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise ImageError(f"cannot stat file: {e.strerror or e}") from None
        if size == 0:
            raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except OSError as e:
        raise ImageError(f"cannot open: {e}") from None
    if max_pixels is not None and img.width * img.height > max_pixels:
        w, h = img.size
        img.close()
        raise ImageError(f"too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    return img


def check_resize(width: int, height: int, policy: SizePolicy, cfg: DataConfig, max_pixels: int | None) -> None:
    """Refuse an image whose resized form would exceed *max_pixels*: a 1 x 100000 strip
    under the ``model`` policy (shorter side to 256) would otherwise become a 25-gigapixel
    intermediate before its centre crop."""
    if max_pixels is None:
        return
    tw, th = target_size(width, height, policy, cfg)
    if tw * th > max_pixels:
        raise ImageError(f"extreme aspect ratio: {width}x{height} would be resized to {tw}x{th} = {tw * th} pixels, "
                         f"over the limit of {max_pixels}")


def region_box(crop_box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """*crop_box* (x1, y1, x2, y2 in original pixels) as whole pixels clipped to a *width* x
    *height* image; an :class:`ImageError` when nothing of it lies inside the image."""
    x1, y1, x2, y2 = crop_box
    box = (max(0, int(np.floor(x1))), max(0, int(np.floor(y1))),
           min(width, int(np.ceil(x2))), min(height, int(np.ceil(y2))))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ImageError(f"crop box {crop_box} is empty for a {width}x{height} image")
    return box


def check_decode(width: int, height: int, policy: SizePolicy | None, cfg: DataConfig | None,
                 max_pixels: int | None, crop_box: tuple[float, float, float, float] | None = None) -> None:
    """The guard every decode path goes through before any pixel is decoded, with or without
    a region: the part of a *width* x *height* image that is used (all of it, or *crop_box*)
    must resize to at most *max_pixels* under *policy* (:func:`check_resize`). A 1 x 8000
    strip asked for as the region 0,0,1,8000 would otherwise become a 256 x 2048000
    intermediate under the ``model`` policy."""
    if crop_box is not None:
        x1, y1, x2, y2 = region_box(crop_box, width, height)
        width, height = x2 - x1, y2 - y1
    if policy is not None and cfg is not None:
        check_resize(width, height, policy, cfg, max_pixels)


def decode_image(
    path: str | os.PathLike | BinaryIO,
    policy: SizePolicy | None = None,
    cfg: DataConfig | None = None,
    *,
    draft: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    crop_box: tuple[float, float, float, float] | None = None,
) -> DecodedImage:
    """Decode one image file to uint8 pixels for the network.

    With a *policy* and *cfg* the image is resized (and centre-cropped for the
    ``model`` policy); JPEGs are draft-decoded at the smallest DCT scale that is
    still at least the target size when *draft* is true. *crop_box* (x1, y1, x2, y2
    in original pixel coordinates, as in Oxford query files) is cut out before
    resizing. Raises :class:`ImageError` for anything unreadable.
    """
    notes: list[str] = []
    img = open_image(path, max_pixels)
    try:
        mode = "L" if cfg is not None and cfg.channel_order == "L" else "RGB"
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block must not lose the image
            orientation = 1
            notes.append("bad-exif")
        raw_w, raw_h = img.size
        swapped = orientation in (5, 6, 7, 8)
        ow, oh = (raw_h, raw_w) if swapped else (raw_w, raw_h)
        check_decode(ow, oh, policy, cfg, max_pixels, crop_box)
        if draft and policy is not None and cfg is not None and img.format == "JPEG" and crop_box is None:
            req = draft_request(ow, oh, policy, cfg)
            if req is not None:
                rw, rh = (req[1], req[0]) if swapped else req
                if rw < raw_w and rh < raw_h:
                    img.draft("RGB" if img.mode in ("RGB", "YCbCr") else img.mode, (rw, rh))
        try:
            img.load()
        except OSError as e:
            msg = str(e)
            if "truncated" in msg:
                raise ImageError("truncated file (image data ends early)") from None
            raise ImageError(f"corrupt image data: {msg}") from None
        except (SyntaxError, ValueError) as e:  # PIL raises these for some malformed headers/chunks
            raise ImageError(f"corrupt image data: {e}") from None
        if orientation != 1:
            try:
                img = ImageOps.exif_transpose(img)
                notes.append("exif-rotated")
            except Exception:
                notes.append("bad-exif")
        img = _to_mode(img, mode, notes)
        if crop_box is not None:  # no draft decode with a region: the image is at its original (oriented) size
            img = img.crop(region_box(crop_box, img.width, img.height))
        if policy is not None and cfg is not None:
            # sizes follow the full-resolution image, so a drafted decode gives exactly the
            # size the header predicts (the pipeline batches by that prediction)
            source = img.size if crop_box is not None else (ow, oh)
            img = resize_image(img, policy, cfg, source_size=source)
        arr = np.array(img, dtype=np.uint8)  # a writable copy, independent of PIL's buffer
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return DecodedImage(arr, ow, oh, tuple(notes))
    finally:
        img.close()


# ---------------------------------------------------------------------------
# check-images
# ---------------------------------------------------------------------------

#: notes that make an image "odd" (usable, but worth knowing about)
_WARNING_NOTES = {
    "cmyk": "CMYK colour (converted to RGB)",
    "16-bit": "16-bit samples (scaled to 8 bits)",
    "32-bit-int": "32-bit integer samples (scaled to 8 bits)",
    "float": "floating-point samples (rescaled)",
    "palette-alpha": "palette with transparency (composited on white)",
    "alpha": "alpha channel (composited on white)",
    "exif-rotated": "EXIF orientation (rotated upright)",
    "bad-exif": "unreadable EXIF block (ignored)",
}


@dataclass
class ImageCheck:
    """The verdict on one file: ``ok``, ``warning`` (odd but usable) or ``error``."""

    path: str
    status: str
    problems: list[str]
    format: str | None = None
    mode: str | None = None
    width: int | None = None
    height: int | None = None
    bytes: int | None = None

    def to_dict(self) -> dict:
        return {"path": printable_path(self.path), "status": self.status, "problems": self.problems,
                "format": self.format, "mode": self.mode, "width": self.width, "height": self.height, "bytes": self.bytes}


def check_image(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int = 32) -> ImageCheck:
    """Inspect one file thoroughly: header, integrity (PNG CRCs, truncation), full decode."""
    res = ImageCheck(path=path, status="ok", problems=[])
    try:
        res.bytes = os.path.getsize(path)
    except OSError:
        pass
    try:
        img = open_image(path, max_pixels)
        res.format, res.mode = img.format, img.mode
        res.width, res.height = img.size
        frames = getattr(img, "n_frames", 1)
        img.close()
        with Image.open(path) as v:  # verify() checks chunk CRCs and structure without decoding
            v.verify()
    except ImageError as e:
        res.status, res.problems = "error", [str(e)]
        return res
    except Exception as e:
        res.status, res.problems = "error", [f"corrupt file structure: {e}"]
        return res
    try:
        d = decode_image(path, None, None, max_pixels=max_pixels)
    except ImageError as e:
        res.status, res.problems = "error", [str(e)]
        return res
    except Exception as e:
        res.status, res.problems = "error", [f"{type(e).__name__}: {e}"]
        return res
    problems = [_WARNING_NOTES[n] for n in d.notes if n in _WARNING_NOTES]
    if res.mode in ("L", "1", "LA", "I;16", "I", "F"):
        problems.append(f"grayscale ({res.mode})")
    if frames and frames > 1:
        problems.append(f"{frames} frames (the first is used)")
    if min(d.width, d.height) < min_side:
        problems.append(f"tiny ({d.width}x{d.height})")
    if res.format and res.format.lower() not in Path(path).suffix.lower().replace("jpg", "jpeg"):
        ext = Path(path).suffix.lower()
        if not (res.format == "JPEG" and ext in (".jpg", ".jpeg", ".jpe", ".jfif")) and not (
                res.format == "TIFF" and ext in (".tif", ".tiff")):
            problems.append(f"extension {ext or '(none)'} but the content is {res.format}")
    if problems:
        res.status, res.problems = "warning", problems
    return res
