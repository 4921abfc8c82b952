"""Write a corpus of hostile image files, and what deepfeat should make of each.

    python scripts/make_hostile_corpus.py OUT            # OUT/files/... and OUT/manifest.json

Every file is made here from a real photo (scikit-image's CC0 samples, as in the tests)
or from a few bytes: truncated and garbage JPEG/PNG, zero bytes, a header claiming
60000 x 60000, a real decompression bomb (a 1-bit PNG of 20000 x 20000 pixels in
60 KB), a 1 x 100000 strip, animated GIF and WebP, multipage TIFF, SVG and HTML named
.jpg, symbolic-link loops (a folder linked into itself, a link to itself), a dangling
link, a FIFO and /dev/zero named .jpg, an unreadable file (chmod 000), and names with a
newline and with bytes that are not UTF-8.

``manifest.json`` maps each file (relative to OUT/files, not-UTF-8 bytes as ``\\xNN``)
to ``{"extract": "ok" | "<words in the reason>", "check": "error" | "usable", "why": ...}``:
``ok`` means the right answer is to decode it (the first frame of an animation, the
first page of a TIFF); otherwise the store lists it as failed with a reason containing
those words. ``tests/test_hostile.py`` runs ``extract`` and ``check-images`` over it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, color_type: int, rows) -> bytes:
    """A PNG streamed row by row (so a bomb never exists uncompressed here either)."""
    z = zlib.compressobj(9)
    data = b"".join(z.compress(b"\0" + row) for row in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _photo() -> Image.Image:
    import tempfile

    from deepfeat.data.samples import write_sample_photos

    with tempfile.TemporaryDirectory() as d:
        img = Image.open(write_sample_photos(d, ["chelsea"])[0]).convert("RGB")
        img.load()
    return img.resize((200, 150))


def make(out: Path) -> dict[str, dict]:
    files = out / "files"
    files.mkdir(parents=True, exist_ok=False)
    photo = _photo()
    rng = np.random.default_rng(0)
    manifest: dict[str, dict] = {}

    def add(name: str | bytes, extract: str, check: str, why: str) -> Path:
        key = name if isinstance(name, str) else name.decode("utf-8", "backslashreplace")
        manifest[key] = {"extract": extract, "check": check, "why": why}
        return Path(os.fsdecode(os.path.join(os.fsencode(files), name if isinstance(name, bytes)
                                              else os.fsencode(name))))

    def jpeg_bytes(img: Image.Image) -> bytes:
        b = io.BytesIO()
        img.save(b, "JPEG", quality=90)
        return b.getvalue()

    jpg = jpeg_bytes(photo)
    b = io.BytesIO()
    photo.save(b, "PNG")
    png = b.getvalue()

    add("truncated.jpg", "truncated", "error", "a JPEG cut in half").write_bytes(jpg[: len(jpg) // 2])
    add("truncated.png", "truncated", "error", "a PNG cut in half").write_bytes(png[: len(png) // 2])
    # a valid JPEG header (SOI + APP0/JFIF) followed by noise
    add("garbage.jpg", "not an image", "error", "JPEG header, random body").write_bytes(
        jpg[:20] + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    add("garbage.png", "not an image", "error", "PNG signature, random body").write_bytes(
        png[:8] + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    add("random.jpg", "not an image", "error", "random bytes").write_bytes(
        rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    add("zero.jpg", "empty file", "error", "zero bytes").write_bytes(b"")
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    add("huge_header.png", "decompression bomb", "error", "IHDR says 60000 x 60000, no pixel data").write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b""))
    add("bomb.png", "decompression bomb", "error", "a real 1-bit 20000 x 20000 PNG (400 Mpixels) in ~60 KB"
        ).write_bytes(_png(20000, 20000, 1, 0, (bytes(2500) for _ in range(20000))))
    add("strip.png", "extreme aspect ratio", "usable",
        "1 x 100000 pixels: decodable, but the model's resize (shorter side to 256) would make it 6.6 Gpixels"
        ).write_bytes(_png(1, 100000, 8, 0, (b"\x80" for _ in range(100000))))

    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), photo.convert("L").convert("RGB")]
    frames[0].save(add("animated.gif", "ok", "usable", "3-frame GIF: the first frame is used"), save_all=True,
                   append_images=frames[1:], duration=100, loop=0)
    frames[0].save(add("animated.webp", "ok", "usable", "3-frame WebP: the first frame is used"), "WEBP",
                   save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(add("multipage.tif", "ok", "usable", "3-page TIFF: the first page is used"), save_all=True,
                   append_images=frames[1:])
    add("svg.jpg", "not an image", "error", "an SVG document named .jpg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>\n')
    add("html.jpg", "not an image", "error", "an HTML page named .jpg").write_text(
        "<!doctype html><html><body><img src=x onerror=alert(1)></body></html>\n")

    loops = files / "loops"
    loops.mkdir()
    os.symlink("..", loops / "back_to_files")  # a folder linked into itself: walked once
    add("loops/self.jpg", "symbolic links", "error", "a symbolic link to itself")
    os.symlink("self.jpg", loops / "self.jpg")
    os.symlink("missing.jpg", add("loops/dangling.jpg", "broken symbolic link", "error", "a link to nothing"))
    os.mkfifo(add("fifo.jpg", "not a regular file", "error", "a FIFO: open() would wait for a writer forever"))
    os.symlink("/dev/zero", add("devzero.jpg", "not a regular file", "error", "/dev/zero: a read never ends"))

    root = os.geteuid() == 0
    p = add("unreadable.jpg", "ok" if root else "Permission denied", "usable" if root else "error",
            "chmod 000: " + ("read anyway, this runs as root (root ignores file permissions)" if root
                             else "cannot be read"))
    p.write_bytes(jpg)
    p.chmod(0)
    add("new\nline.jpg", "ok", "usable", "a newline in the name: decoded, the name kept as it is").write_bytes(jpg)
    add(b"bad-\xff\xfe-utf8.jpg", "not valid UTF-8", "error",
        "name bytes that are not UTF-8: stores hold UTF-8 paths, so it is reported (rename it)").write_bytes(jpg)
    add("fine.jpg", "ok", "usable", "a plain photo, for comparison").write_bytes(jpg)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="a new folder: files/ and manifest.json are written there")
    args = ap.parse_args(argv)
    manifest = make(Path(args.out))
    print(f"{len(manifest)} hostile files in {Path(args.out) / 'files'}; expectations in "
          f"{Path(args.out) / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
