"""Build "skimage-patches", a labelled photo collection from scikit-image's bundled photos.

The second real collection of the fine-tuning measurements (docs/results.md): ten
photographs that ship inside the scikit-image wheel (0.26.0 here; the ``demo`` extra;
no download at run time) are the ten classes; each class holds N seeded random views of
its photo: a square crop of 20-45 % of the photo's shorter side at a random place,
mirrored with probability 1/2, brightness and contrast scaled by U(0.8, 1.2), resized to
192 x 192 and saved as JPEG (quality 90). Retrieving the other views of a query's photo
is then a patch-to-scene task: two views of one class may share no pixel (different
parts of the astronaut photo, say), so it is not solved by near-duplicate matching.

    python scripts/make_skimage_patches.py /tmp/skimage-patches --per-class 60 --seed 0

The same seed, N and scikit-image version give the same files, byte for byte. The
split into training and held-out images is then ``deepfeat finetune``'s own seeded
per-class split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

#: class name -> scikit-image loader (photographs only: no synthetic or binary images)
PHOTOS = {
    "astronaut": "astronaut", "brick": "brick", "camera": "camera", "chelsea": "chelsea", "coffee": "coffee",
    "grass": "grass", "gravel": "gravel", "hubble": "hubble_deep_field", "motorcycle": "stereo_motorcycle",
    "rocket": "rocket",
}


def build(out: Path, per_class: int = 60, seed: int = 0, size: int = 192) -> list[Path]:
    import skimage
    import skimage.data as skdata
    from PIL import Image, ImageEnhance, ImageOps

    written = []
    for c, (name, loader) in enumerate(PHOTOS.items()):
        px = getattr(skdata, loader)()
        img = Image.fromarray(px[0] if isinstance(px, tuple) else px).convert("RGB")  # stereo: the left view
        w, h = img.size
        rng = np.random.default_rng([seed, c])
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = int(round(rng.uniform(0.20, 0.45) * min(w, h)))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            view = img.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                view = ImageOps.mirror(view)
            view = ImageEnhance.Brightness(view).enhance(float(rng.uniform(0.8, 1.2)))
            view = ImageEnhance.Contrast(view).enhance(float(rng.uniform(0.8, 1.2)))
            p = d / f"{name}_{i:03d}.jpg"
            view.save(p, quality=90)
            written.append(p)
    (out / "SOURCE.txt").write_text(
        f"Views of scikit-image {skimage.__version__} bundled photos ({', '.join(PHOTOS.values())}), "
        f"built by scripts/make_skimage_patches.py --per-class {per_class} --seed {seed}; licences: see "
        "skimage/data/README.txt and the scikit-image docs (public domain / CC0 / BSD).\n", encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="folder to write (one sub-folder per class)")
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=192)
    args = ap.parse_args(argv)
    files = build(Path(args.output), args.per_class, args.seed, args.size)
    print(f"wrote {len(files)} images in {len(PHOTOS)} classes to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
