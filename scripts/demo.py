"""`make demo`: the main job on the embedded model and real photos, offline.

Writes a few freely licensed photos (from scikit-image's bundled data) and a small
retrieval collection made from them, then runs the documented commands one after
another, printing each command before its output.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

from deepfeat.cli import COMMAND_MODULES, main
from deepfeat.data.samples import write_sample_photos


def make_collection(photos: list[str], folder: Path) -> Path:
    """Four views of each photo (crop, mirror, darker, smaller) in one folder per photo:
    a near-duplicate retrieval set with a ground truth (relevant = same folder)."""
    for p in photos:
        img = Image.open(p).convert("RGB")
        name = Path(p).stem
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        w, h = img.size
        views = {
            "crop": img.crop((w // 10, h // 10, w - w // 8, h - h // 12)),
            "mirror": ImageOps.mirror(img),
            "dark": ImageEnhance.Brightness(img).enhance(0.6),
            "small": img.resize((w // 2, h // 2), Image.Resampling.BICUBIC),
        }
        for v, im in views.items():
            im.save(d / f"{name}_{v}.jpg", quality=88)
    return folder


def run(cmd: str) -> int:
    print(f"\n$ deepfeat {cmd}", flush=True)
    t0 = time.perf_counter()
    rc = main(shlex.split(cmd))
    sys.stdout.flush()
    print(f"[exit {rc}, {time.perf_counter() - t0:.1f}s]", file=sys.stderr, flush=True)
    return rc


def main_demo() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    photos = write_sample_photos(out / "photos")
    coll = make_collection(photos, out / "collection")
    print(f"sample photos in {out / 'photos'} (licences in LICENSES.txt); collection of {4 * len(photos)} views "
          f"in {coll}")
    steps = [
        "models",
        f"classify {out / 'photos'} --top 3",
        "layers --no-params --depth 1",
        f"extract {coll} -o {out / 'store'} --pool gem --post l2",
        f"info {out / 'store'}",
    ]
    store = out / "store"
    optional = [  # (command module, command): later parts of the job, run when present
        ("cmd_search", f"index {store}"),
        ("cmd_search", f"search {store} {photos[0]} --top 5"),
        ("cmd_search", f"search {store} {coll / 'coffee_espresso' / 'coffee_espresso_dark.jpg'} --top 5 "
                       f"--gt folders --grid {out / 'search_grid.png'}"),
        ("cmd_search", f"eval {store} --gt folders"),
    ]
    steps += [cmd for mod, cmd in optional if mod in COMMAND_MODULES]
    failed = 0
    for cmd in steps:
        failed += run(cmd) != 0
    print(f"\ndemo finished: {len(steps) - failed}/{len(steps)} commands succeeded; outputs in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main_demo())
