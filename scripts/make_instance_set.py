#!/usr/bin/env python
"""Build an instance-retrieval set from real photos: edited copies of Flowers 17 images.

For a seeded subset of N originals (default 200 of the 1360), three edited copies each
are written; the queries are the copies, the database is all of Flowers 17 (the
originals + the other images as distractors), and the one relevant image of a query is
its original. The edits, with the random parameters drawn per image from
``numpy.random.default_rng([seed, k])`` (k = the image's position in the subset):

* ``crop_rot``: rotate by a = U(10, 25) degrees, sign random (bicubic, same canvas,
  black corners), then crop a window of U(0.55, 0.75) x width by U(0.55, 0.75) x height
  at a uniformly random position inside the central 90% of the rotated image; JPEG q=90.
* ``jpeg``: downscale to half size (bicubic), then JPEG quality 10.
* ``color_blur``: brightness x U(0.6, 1.4), contrast x U(0.6, 1.4), saturation x
  U(0.3, 1.7) (PIL ImageEnhance), hue rotated by U(-0.08, 0.08) of the colour circle
  (in HSV), then Gaussian blur of radius U(2, 4) pixels; JPEG q=90.

The database is all of Flowers 17, or with ``--distractors M`` the N originals and M
other images drawn with ``default_rng([seed, 1])``; ``OUT/database.txt`` lists it
(absolute paths, for ``deepfeat extract @OUT/database.txt``).

Writes ``OUT/queries/<edit>/q_<edit>_<class>_<image>.jpg``, ``OUT/queries.csv``
(query, original, edit) and ``OUT/gnd.json`` (the revisited ground-truth format of
``deepfeat eval --gt revisited-medium:OUT/gnd.json``: ``imlist`` = the Flowers 17 images,
``qimlist`` = the queries, one ``easy`` positive each), so a store holding both the
database and the queries evaluates with the CLI (query images are excluded from every
ranking). ``benchmarks/bench_rerank.py`` uses separate database and query stores.

With ``--views V`` (default 1: the set above, byte for byte) the database also holds,
for every picked original k, V-1 extra edited views ``OUT/database/<stem>_v<j>.jpg``
(j = 1..V-1), made with the edit ``("crop_rot", "color_blur", "jpeg")[(j - 1) % 3]``
but with their own parameters from ``numpy.random.default_rng([seed, k, j])``, so they
differ from the query copies: ``crop_rot`` and ``color_blur`` as above (JPEG q=90);
``jpeg`` (which has no random parameter for the queries) here downscales by U(0.4, 0.6)
(bicubic) and saves at integer quality U(10, 30). A query's relevant set is then its
original + the V-1 views of that original: ``queries.csv`` gets a fourth column
``relevant`` (the ';'-joined names, Flowers-17-relative for the original, ``OUT``-relative
``database/...`` for the views), ``database.txt`` lists the views after the Flowers 17
images, and ``gnd.json``'s ``easy`` holds all V indices (``imlist`` names the views
``database/<stem>_v<j>``).

    python scripts/make_instance_set.py --flowers ../shared/data/flowers17 --out instance-set
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

EDITS = ("crop_rot", "jpeg", "color_blur")


def crop_rot(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.uniform(10, 25)) * (1 if rng.random() < 0.5 else -1)
    r = img.rotate(angle, resample=Image.Resampling.BICUBIC)
    w, h = r.size
    fw, fh = rng.uniform(0.55, 0.75, size=2)
    cw, ch = int(w * fw), int(h * fh)
    x0 = int(rng.uniform(0.05 * w, 0.95 * w - cw))
    y0 = int(rng.uniform(0.05 * h, 0.95 * h - ch))
    return r.crop((x0, y0, x0 + cw, y0 + ch))


def color_blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    b, c, s = rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.3, 1.7)
    hue = rng.uniform(-0.08, 0.08)
    radius = rng.uniform(2, 4)
    out = ImageEnhance.Brightness(img).enhance(b)
    out = ImageEnhance.Contrast(out).enhance(c)
    out = ImageEnhance.Color(out).enhance(s)
    hsv = np.array(out.convert("HSV"))
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(hue * 256))) % 256).astype(np.uint8)
    out = Image.fromarray(hsv, "HSV").convert("RGB")
    return out.filter(ImageFilter.GaussianBlur(radius))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flowers", default="../shared/data/flowers17", help="the Flowers 17 folder")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--n", type=int, default=200, help="originals to edit (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distractors", type=int, default=None,
                    help="database = the N originals + this many other Flowers 17 images, seeded (default: all)")
    ap.add_argument("--views", type=int, default=1,
                    help="database images per instance: the original + V-1 edited views (default 1)")
    args = ap.parse_args()
    if args.views < 1:
        ap.error("--views must be >= 1")
    root = Path(args.flowers)
    originals = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.jpg"))
    if not originals:
        ap.error(f"no */*.jpg images in {root}")
    if not 0 < args.n <= len(originals):
        ap.error(f"--n must be in 1..{len(originals)}")
    pick = sorted(np.random.default_rng(args.seed).choice(len(originals), size=args.n, replace=False).tolist())
    out = Path(args.out)
    rows = []
    views = {}  # original rel -> [OUT-relative view names]
    for k, i in enumerate(pick):
        rel = originals[i]
        img = Image.open(root / rel).convert("RGB")
        rng = np.random.default_rng([args.seed, k])
        stem = rel.replace("/", "_").rsplit(".", 1)[0]
        edited = {"crop_rot": crop_rot(img, rng), "color_blur": color_blur(img, rng)}
        for edit in EDITS:
            d = out / "queries" / edit
            d.mkdir(parents=True, exist_ok=True)
            q = d / f"q_{edit}_{stem}.jpg"
            if edit == "jpeg":
                img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC).save(q, quality=10)
            else:
                edited[edit].save(q, quality=90)
            rows.append((q.relative_to(out).as_posix(), rel, edit))
        for j in range(1, args.views):
            vrng = np.random.default_rng([args.seed, k, j])
            kind = ("crop_rot", "color_blur", "jpeg")[(j - 1) % 3]
            d = out / "database"
            d.mkdir(parents=True, exist_ok=True)
            v = d / f"{stem}_v{j}.jpg"
            if kind == "jpeg":
                f = float(vrng.uniform(0.4, 0.6))
                img.resize((max(1, int(img.width * f)), max(1, int(img.height * f))),
                           Image.Resampling.BICUBIC).save(v, quality=int(vrng.integers(10, 31)))
            else:
                (crop_rot if kind == "crop_rot" else color_blur)(img, vrng).save(v, quality=90)
            views.setdefault(rel, []).append(v.relative_to(out).as_posix())
    with open(out / "queries.csv", "w", newline="") as f:
        w = csv.writer(f)
        if args.views == 1:
            w.writerow(["query", "original", "edit"])
            w.writerows(rows)
        else:
            w.writerow(["query", "original", "edit", "relevant"])
            w.writerows([(q, o, e, ";".join([o] + views[o])) for q, o, e in rows])
    rest = [j for j in range(len(originals)) if j not in set(pick)]
    if args.distractors is not None:
        if not 0 <= args.distractors <= len(rest):
            ap.error(f"--distractors must be in 0..{len(rest)}")
        rest = sorted(np.random.default_rng([args.seed, 1]).choice(rest, size=args.distractors, replace=False).tolist())
    db = sorted(pick + rest)
    vlist = [v for o in sorted(views) for v in views[o]]
    (out / "database.txt").write_text("".join(f"{(root / originals[j]).resolve()}\n" for j in db)
                                      + "".join(f"{(out / v).resolve()}\n" for v in vlist))
    originals = [originals[j] for j in db] + vlist
    index = {name: j for j, name in enumerate(originals)}
    gnd = {"format": "deepfeat-revisited-gnd", "version": 1,
           "imlist": [n.rsplit(".", 1)[0] for n in originals],
           "qimlist": [Path(q).stem for q, _, _ in rows],
           "gnd": [{"bbx": None, "easy": [index[o]] + [index[v] for v in views.get(o, [])], "hard": [], "junk": []}
                   for _, o, _ in rows]}
    (out / "gnd.json").write_text(json.dumps(gnd) + "\n")
    print(f"{len(rows)} queries ({len(pick)} originals x {len(EDITS)} edits) in {out}; "
          f"database: {len(originals)} images of {root} (listed in {out / 'database.txt'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
