"""Shared fixtures: the real embedded model, real photos, and a corpus of broken images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEEPFEAT_SHARED", REPO.parent / "shared"))
SHARED_DATA = Path(os.environ.get("DEEPFEAT_SHARED_DATA", SHARED / "data"))
SHARED_CAFFE = Path(os.environ.get("DEEPFEAT_SHARED_CAFFE", SHARED / "caffe"))

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="session", autouse=True)
def graph_cache(tmp_path_factory) -> Path:
    """The exported-graph cache of every test (and of the processes they start) in a folder of this
    run, not the user's ~/.cache/deepfeat."""
    folder = tmp_path_factory.mktemp("graph-cache")
    os.environ["DEEPFEAT_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def lite0():
    import deepfeat

    return deepfeat.load_model("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, str]:
    """Real photos (scikit-image's CC0/public-domain samples) as JPEG files."""
    from deepfeat.data.samples import SAMPLES, write_sample_photos

    folder = tmp_path_factory.mktemp("photos")
    paths = write_sample_photos(folder)
    return dict(zip(SAMPLES, paths))


def _jpeg_with_orientation(path: Path, arr: np.ndarray, orientation: int) -> None:
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, quality=90, exif=exif.tobytes())


@pytest.fixture(scope="session")
def odd_images(tmp_path_factory, photos) -> dict[str, Path]:
    """A corpus of broken and odd images, each made from a real photo."""
    d = tmp_path_factory.mktemp("odd")
    cat = np.asarray(Image.open(photos["chelsea"]).convert("RGB"))
    out: dict[str, Path] = {}

    def p(name: str) -> Path:
        out[name] = d / name
        return out[name]

    p("empty.jpg").write_bytes(b"")
    p("not_image.jpg").write_text("this is a text file, not a JPEG\n")
    full = Path(photos["chelsea"]).read_bytes()
    p("truncated.jpg").write_bytes(full[: len(full) // 2])
    Image.fromarray(cat).convert("L").save(p("gray.png"))
    rgba = Image.fromarray(cat).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(p("rgba.png"))
    Image.fromarray(cat).convert("CMYK").save(p("cmyk.jpg"), quality=90)
    g16 = (np.asarray(Image.fromarray(cat).convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(g16).save(p("gray16.png"))
    pal = Image.fromarray(cat).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    pal.save(p("palette_alpha.png"), transparency=0)
    # the photo stored rotated 90 degrees with an EXIF tag saying "rotate back" (orientation 6)
    _jpeg_with_orientation(p("exif_rotated.jpg"), np.rot90(cat, k=1).copy(), 6)
    # PNG with a corrupted CRC in the IHDR chunk
    png = bytearray((d / "gray.png").read_bytes())
    png[29] ^= 0xFF
    p("bad_crc.png").write_bytes(bytes(png))
    # a header claiming a huge image (decompression bomb) with no data behind it
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    p("bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return out


def requires_shared_data():
    return pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


#: for tests that use the real Caffe models and reference prototxts of ../shared/caffe
needs_shared_caffe = pytest.mark.skipif(not SHARED_CAFFE.is_dir(),
                                        reason=f"shared Caffe models not found at {SHARED_CAFFE}")


@pytest.fixture(scope="session")
def sample_store(tmp_path_factory) -> Path:
    """The sample photos extracted by the embedded model with the default settings, once per run:
    tests read it and never change it (a test that changes a store makes its own)."""
    from deepfeat.data.samples import write_sample_photos
    from deepfeat.pipeline import ExtractConfig, extract

    root = tmp_path_factory.mktemp("sample_store")
    write_sample_photos(root / "img")
    extract(ExtractConfig(inputs=[str(root / "img")], output=str(root / "store"), workers=0, progress="none"))
    return root / "store"


@pytest.fixture(scope="session")
def collection(tmp_path_factory, photos) -> Path:
    """A small collection of real photos at several sizes and aspect ratios (24 files in 2 folders)."""
    root = tmp_path_factory.mktemp("collection")
    (root / "a").mkdir()
    (root / "b").mkdir()
    sizes = [(320, 240), (240, 320), (300, 300), (400, 300), (320, 240)]
    n = 0
    for name, path in photos.items():
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for j, (tw, th) in enumerate(sizes[:5]):
            if n >= 24:
                break
            # a different crop of the photo each time, so every file is a distinct image
            box = (j * w // 20, j * h // 25, w - (4 - j) * w // 30, h - (4 - j) * h // 40)
            im = img.crop(box).resize((tw, th), Image.Resampling.BICUBIC)
            folder = root / ("a" if n % 2 == 0 else "b")
            ext = "png" if n % 5 == 4 else "jpg"
            im.save(folder / f"{name}_{j}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
            n += 1
    return root
