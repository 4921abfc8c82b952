#!/usr/bin/env python
"""Build a near-duplicate set from real photos: copies of Flowers 17 images among the rest.

For a seeded subset of N originals (default 120), each original k gets two copies, of the
kinds ``KINDS[k % 7]`` and ``KINDS[(k + 3) % 7]``, with parameters from
``numpy.random.default_rng([seed, k, j])`` (j = 0, 1):

* ``crop_rot``, ``color_blur``: the edits of ``scripts/make_instance_set.py`` (rotation by
  10-25 degrees then a 55-75% crop; brightness, contrast, saturation, hue, blur), JPEG q=90;
* ``jpeg``: downscaled by U(0.4, 0.6), saved at JPEG quality U(10, 30);
* ``exact``: the same bytes;
* ``reencode``: the decoded pixels saved as PNG (the same image re-saved);
* ``resave``: saved again as JPEG at quality 95 (new bytes, nearly the same pixels);
* ``mirror``: flipped left-right, JPEG q=90.

The collection is the originals, their copies and M other Flowers 17 images (default
600, seeded): many photos of the same kinds of flowers, which a global descriptor
finds as close as the copies. Writes ``OUT/images/<class>/<name>`` and ``OUT/groups.csv``
(path relative to OUT, group: the original's name for an original and its copies, empty
for the others), the ground truth of ``benchmarks/bench_duplicates.py``.

    python scripts/make_duplicate_set.py --flowers ../shared/data/flowers17 --out dup-set
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

KINDS = ("crop_rot", "jpeg", "exact", "color_blur", "reencode", "mirror", "resave")


def _instance_edits():
    """crop_rot and color_blur from make_instance_set.py, beside this script."""
    spec = importlib.util.spec_from_file_location("make_instance_set", Path(__file__).with_name("make_instance_set.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.crop_rot, mod.color_blur


def write_copy(src: Path, img: Image.Image, kind: str, dst_stem: Path, rng: np.random.Generator) -> Path:
    """Write one copy of *src* (decoded as *img*) of *kind*; returns its path."""
    crop_rot, color_blur = _instance_edits()
    if kind == "exact":
        out = dst_stem.with_suffix(src.suffix)
        shutil.copyfile(src, out)
    elif kind == "reencode":
        out = dst_stem.with_suffix(".png")
        img.save(out)
    elif kind == "resave":
        out = dst_stem.with_suffix(".jpg")
        img.save(out, quality=95)
    elif kind == "jpeg":
        out = dst_stem.with_suffix(".jpg")
        f = float(rng.uniform(0.4, 0.6))
        img.resize((max(1, int(img.width * f)), max(1, int(img.height * f))), Image.Resampling.BICUBIC) \
            .save(out, quality=int(rng.integers(10, 31)))
    elif kind == "mirror":
        out = dst_stem.with_suffix(".jpg")
        ImageOps.mirror(img).save(out, quality=90)
    else:
        out = dst_stem.with_suffix(".jpg")
        (crop_rot if kind == "crop_rot" else color_blur)(img, rng).save(out, quality=90)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flowers", default="../shared/data/flowers17", help="the Flowers 17 folder")
    ap.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    ap.add_argument("--n", type=int, default=120, help="originals that get copies (default 120)")
    ap.add_argument("--others", type=int, default=600, help="other Flowers 17 images in the collection (default 600)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root, out = Path(args.flowers), Path(args.out)
    names = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.jpg"))
    if not names:
        ap.error(f"no */*.jpg images in {root}")
    if not 0 < args.n <= len(names) or not 0 <= args.others <= len(names) - args.n:
        ap.error(f"--n + --others must fit in the {len(names)} images")
    if out.exists() and any(out.iterdir()):
        ap.error(f"{out} is not empty")
    order = np.random.default_rng(args.seed).permutation(len(names))
    picked, others = sorted(order[: args.n].tolist()), sorted(order[args.n: args.n + args.others].tolist())
    rows = []
    for k, i in enumerate(picked):
        rel = names[i]
        src = root / rel
        d = out / "images" / rel.split("/")[0]
        d.mkdir(parents=True, exist_ok=True)
        orig = d / Path(rel).name
        shutil.copyfile(src, orig)
        group = Path(rel).stem
        rows.append((orig.relative_to(out).as_posix(), group))
        img = Image.open(src).convert("RGB")
        for j, kind in enumerate((KINDS[k % len(KINDS)], KINDS[(k + 3) % len(KINDS)])):
            rng = np.random.default_rng([args.seed, k, j])
            p = write_copy(src, img, kind, d / f"{group}_copy{j}_{kind}", rng)
            rows.append((p.relative_to(out).as_posix(), group))
    for i in others:
        rel = names[i]
        d = out / "images" / rel.split("/")[0]
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, d / Path(rel).name)
        rows.append(((d / Path(rel).name).relative_to(out).as_posix(), ""))
    rows.sort()
    with open(out / "groups.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "group"])
        w.writerows(rows)
    print(f"{len(rows)} images in {out / 'images'}: {args.n} originals with 2 copies each "
          f"({', '.join(KINDS)}), {args.others} others")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
