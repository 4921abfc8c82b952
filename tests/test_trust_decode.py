"""Issue 26, section 3 (part): every decode path, with or without a region, goes through the same
pixel and aspect guard (:func:`deepfeat.data.images.check_decode`).

A 117-byte 1 x 8000 PNG asked for as the region ``0,0,1,8000`` would become a 256 x 2048000
intermediate under the ``model`` size policy (3 GB of peak memory in the server, 13 GB for
1 x 40000); it is refused before any pixel is decoded, in the library, in ``deepfeat search
--bbox`` (a real process) and in the service's upload with ``bbox``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from deepfeat.data.images import check_decode, decode_image
from deepfeat.data.preprocess import DataConfig, SizePolicy
from deepfeat.errors import ImageError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def strip(path: Path, w: int = 1, h: int = 8000) -> Path:
    Image.new("RGB", (w, h), "white").save(path)
    return path


@pytest.fixture(scope="module")
def store(sample_store) -> Path:
    return sample_store  # read only


@pytest.mark.parametrize("crop_box", [None, (0, 0, 1, 8000), (0, 0, 50, 1e9), (-5, -5, 1, 8000)])
@pytest.mark.parametrize("policy", [SizePolicy("model"), SizePolicy("short", 224)])
def test_an_extreme_strip_is_refused_with_or_without_a_region(tmp_path, crop_box, policy):
    png = strip(tmp_path / "strip.png")
    assert png.stat().st_size < 1000
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        decode_image(png, policy, DataConfig(), crop_box=crop_box)


def test_a_region_of_a_large_image_is_judged_by_the_region(tmp_path):
    """The guard measures the part that is used: a square image is fine, its 1-pixel-wide column is not,
    and a reasonable region of it decodes to the policy's size."""
    png = strip(tmp_path / "square.png", 4000, 4000)
    with pytest.raises(ImageError, match="extreme aspect ratio: 1x4000"):
        decode_image(png, SizePolicy("short", 224), DataConfig(), crop_box=(10, 0, 11, 4000))
    px = decode_image(png, SizePolicy("short", 224), DataConfig(), crop_box=(0, 0, 400, 200)).pixels
    assert px.shape == (224, 448, 3)


def test_the_guard_runs_before_any_pixel_is_decoded():
    """check_decode needs only the header's size: an empty region and an extreme one are refused from numbers."""
    with pytest.raises(ImageError, match="is empty for a 10x10 image"):
        check_decode(10, 10, None, None, None, crop_box=(20, 20, 30, 30))
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        check_decode(1, 8000, SizePolicy("model"), DataConfig(), 89_000_000, crop_box=(0, 0, 1, 8000))
    check_decode(1, 8000, SizePolicy("model"), DataConfig(), None, crop_box=(0, 0, 1, 8000))  # no limit asked


def test_the_query_embedder_applies_the_guard_and_its_limit(store, tmp_path):
    from deepfeat.search import SearchEngine

    engine = SearchEngine(store)
    png = strip(tmp_path / "strip.png")
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        engine.decode(png, (0, 0, 1, 8000))
    square = strip(tmp_path / "square.png", 300, 300)
    with pytest.raises(ImageError, match="the limit of 1000$"):
        engine.embedder.decode(square, (0, 0, 300, 300), max_pixels=1000)


@pytest.mark.slow
def test_cli_search_bbox_on_an_extreme_strip_is_one_line(store, tmp_path):
    png = strip(tmp_path / "strip.png")
    r = subprocess.run([sys.executable, "-m", "deepfeat", "search", str(store), str(png), "--bbox", "0,0,1,8000"],
                       capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": SRC}, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "extreme aspect ratio" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_serve_upload_with_bbox_on_an_extreme_strip_is_a_json_422(store, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from deepfeat.serve import create_app

    png = strip(tmp_path / "strip.png")
    with TestClient(create_app(store)) as client:
        for bbox in ("0,0,1,8000", None):
            params = {"k": 3, **({"bbox": bbox} if bbox else {})}
            with open(png, "rb") as f:
                r = client.post("/api/search/upload", params=params, files={"file": ("strip.png", f, "image/png")})
            assert r.status_code == 422, (bbox, r.status_code, r.text)
            assert "extreme aspect ratio" in r.json()["error"]
        square = strip(tmp_path / "square.png", 200, 200)
        with open(square, "rb") as f:
            r = client.post("/api/search/upload", params={"k": 3, "bbox": "0,0,100,100"},
                            files={"file": ("square.png", f, "image/png")})
        assert r.status_code == 200 and len(r.json()["hits"]) == 3 and r.json()["query"]["bbox"] == [0, 0, 100, 100], r.text
