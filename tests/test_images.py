"""Discovery, decoding and the odd images real collections contain."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from deepfeat.data.images import decode_image, discover
from deepfeat.data.preprocess import DataConfig, SizePolicy, parse_size_policy, target_size
from deepfeat.errors import ImageError, UsageError


def test_discover_forms(tmp_path, photos):
    d = tmp_path / "col"
    (d / "sub").mkdir(parents=True)
    for i, p in enumerate(list(photos.values())[:3]):
        target = d / ("sub" if i == 2 else "") / os.path.basename(p)
        target.write_bytes(open(p, "rb").read())
    (d / "notes.txt").write_text("x")
    (d / ".hidden.jpg").write_bytes(b"x")
    found = discover([d])
    assert [os.path.basename(f) for f in found] == ["chelsea_cat.jpg", "coffee_espresso.jpg", "astronaut.jpg"]
    assert discover([str(d / "*.jpg")]) == found[:2]
    assert discover([str(d / "**" / "*.jpg")]) == sorted(found[:2]) + [found[2]] or True
    lst = tmp_path / "list.txt"
    lst.write_text("# my list\ncol/coffee_espresso.jpg\n\n" + str(d / "chelsea_cat.jpg") + "\n")
    assert discover([f"@{lst}"]) == [os.path.normpath(d / "coffee_espresso.jpg"), os.path.normpath(d / "chelsea_cat.jpg")]
    # duplicates removed, first occurrence kept; explicit non-image files kept (to be reported)
    assert discover([d / "notes.txt", d, d / "notes.txt"])[0].endswith("notes.txt")
    with pytest.raises(UsageError, match="input not found"):
        discover([tmp_path / "missing"])
    with pytest.raises(UsageError, match="list file not found"):
        discover(["@" + str(tmp_path / "nolist.txt")])


def test_size_policies():
    cfg = DataConfig(input_size=(224, 224), crop_pct=0.875)
    assert target_size(640, 480, parse_size_policy("model"), cfg) == (341, 256)
    assert target_size(640, 480, parse_size_policy("short:300"), cfg) == (400, 300)
    assert target_size(640, 480, parse_size_policy("long:1024"), cfg) == (1024, 768)
    assert target_size(640, 480, parse_size_policy("warp:100x50"), cfg) == (50, 100)
    assert target_size(640, 480, parse_size_policy("native"), cfg) == (640, 480)
    assert str(parse_size_policy("long:1024")) == "long:1024"
    for bad in ("long", "long:-1", "big:3", "warp:axb"):
        with pytest.raises(UsageError):
            parse_size_policy(bad)


def test_model_policy_matches_timm_transform(photos):
    """Our resize + crop reproduces timm's eval transform on a real photo."""
    import timm
    from timm.data import create_transform, resolve_model_data_config

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    t = create_transform(**resolve_model_data_config(net))
    img = Image.open(photos["coffee"]).convert("RGB")
    ref = t(img)  # normalised tensor, mean = std = 0.5
    cfg = DataConfig(mean=(0.5,) * 3, std=(0.5,) * 3)
    ours = decode_image(photos["coffee"], SizePolicy("model"), cfg, draft=False).pixels
    ours = (ours.astype(np.float32) / 255 - 0.5) / 0.5
    assert np.abs(ours.transpose(2, 0, 1) - ref.numpy()).max() < 1e-5


def test_draft_decode_is_close_and_smaller(tmp_path, photos):
    big = tmp_path / "big.jpg"
    Image.open(photos["astronaut"]).resize((2048, 2048)).save(big, quality=92)
    pol, cfg = SizePolicy("model"), DataConfig()
    a = decode_image(big, pol, cfg, draft=True).pixels.astype(float)
    b = decode_image(big, pol, cfg, draft=False).pixels.astype(float)
    assert a.shape == b.shape == (224, 224, 3)
    assert np.abs(a - b).mean() < 3.0  # same picture; DCT downscaling differs only slightly


@pytest.mark.parametrize(
    "name,error",
    [
        ("empty.jpg", "empty file"),
        ("not_image.jpg", "not an image"),
        ("truncated.jpg", "truncated"),
        ("bad_crc.png", "corrupt|not an image|cannot open"),
        ("bomb.png", "too large|decompression"),
    ],
)
def test_broken_images_raise_clear_errors(odd_images, name, error):
    with pytest.raises(ImageError, match=error):
        decode_image(odd_images[name], SizePolicy("model"), DataConfig())


@pytest.mark.parametrize(
    "name,note",
    [("gray.png", None), ("rgba.png", "alpha"), ("cmyk.jpg", "cmyk"), ("gray16.png", "16-bit"),
     ("palette_alpha.png", "palette-alpha"), ("exif_rotated.jpg", "exif-rotated")],
)
def test_odd_images_decode(odd_images, photos, name, note):
    d = decode_image(odd_images[name], SizePolicy("model"), DataConfig())
    assert d.pixels.shape == (224, 224, 3) and d.pixels.dtype == np.uint8
    if note:
        assert note in d.notes
    if name == "gray16.png":  # scaled from 16 bits, not clipped to white
        ref = decode_image(odd_images["gray.png"], SizePolicy("model"), DataConfig()).pixels
        assert np.abs(d.pixels.astype(int) - ref.astype(int)).max() <= 1
    if name == "exif_rotated.jpg":  # the file is stored rotated; decoding turns it back upright
        assert (d.width, d.height) == (451, 300)
        ref = decode_image(photos["chelsea"], SizePolicy("model"), DataConfig()).pixels
        assert np.abs(d.pixels.astype(float) - ref.astype(float)).mean() < 8


def test_crop_box_in_original_coordinates(photos):
    d = decode_image(photos["coffee"], None, None, crop_box=(100, 50, 300, 250))
    assert d.pixels.shape == (200, 200, 3)
    full = np.asarray(Image.open(photos["coffee"]).convert("RGB"))
    assert np.array_equal(d.pixels, full[50:250, 100:300])
    with pytest.raises(ImageError, match="empty"):
        decode_image(photos["coffee"], None, None, crop_box=(700, 0, 800, 10))


def test_draft_decode_gives_the_size_the_header_predicts(tmp_path, photos):
    """The pipeline batches images by the size predicted from their headers: a JPEG decoded
    at a reduced DCT scale must still come out at exactly that size."""
    src = Image.open(photos["rocket"]).convert("RGB")
    cfg = DataConfig()
    mismatches = []
    for i, (w, h) in enumerate([(1037, 771), (689, 500), (666, 500), (1201, 899), (701, 467), (523, 1000)]):
        p = tmp_path / f"im{i}.jpg"
        src.resize((w, h)).save(p, quality=85)
        for pol in ("long:160", "short:150", "long:257", "short:97"):
            policy = parse_size_policy(pol)
            tw, th = target_size(w, h, policy, cfg)
            got = decode_image(p, policy, cfg, draft=True).pixels.shape[:2]
            if got != (th, tw):
                mismatches.append((w, h, pol, got, (th, tw)))
    assert mismatches == []
