"""Does memory stay flat as the input grows? Peak RSS of `deepfeat extract` at N and 100 N.

The collection is made of symbolic links to real images (so 100k distinct paths cost no
disk), and the network work per image is kept small (`--size warp:64`, an early layer)
so that 100k images take minutes: what grows with N in the pipeline (the plan, the
items, the shards, consolidation) is the same whatever the model costs per image, and
the per-batch memory of a bigger model is bounded by the batch size either way.

    python benchmarks/bench_memory.py --images ../shared/data/flowers17 --small 1000 --large 100000

Prints the peak RSS of each run (the extract process; decode workers are smaller) and the
difference, and writes JSON (default bench-out/memory.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNNER = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t0)
"""


def make_links(images: list[str], n: int, folder: Path) -> Path:
    """n symlinks in sub-folders of 1000, cycling over the real images."""
    for i in range(n):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        src = images[i % len(images)]
        os.symlink(os.path.abspath(src), sub / f"{i:07d}{Path(src).suffix}")
    return folder


def measure(n: int, images: list[str], tmp: Path, args) -> dict:
    coll = make_links(images, n, tmp / f"coll{n}")
    out = tmp / f"store{n}"
    cmd = [sys.executable, "-m", "deepfeat.cli", "extract", str(coll), "-o", str(out), "--size", args.size,
           "--layer", args.layer, "--pool", "gem", "--progress", "none", "--backend", args.backend]
    res = subprocess.run([sys.executable, "-c", RUNNER, *cmd], capture_output=True, text=True, check=True)
    rc, maxrss_kb, seconds = res.stdout.split()
    if int(rc) != 0:
        raise SystemExit(f"extract failed for n={n}")
    shards = len(list((out / "shards").glob("*.items.parquet")))
    shutil.rmtree(coll)
    shutil.rmtree(out)
    return {"n": n, "peak_rss_mb": int(maxrss_kb) / 1024, "seconds": float(seconds), "shards": shards,
            "images_per_s": n / float(seconds)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers17"))
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--size", default="warp:64")
    ap.add_argument("--layer", default="blocks.2")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--out", default="bench-out/memory.json")
    args = ap.parse_args()

    from deepfeat.data.images import discover

    images = discover([args.images])
    if not images:
        print(f"no images in {args.images}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        t0 = time.perf_counter()
        small = measure(args.small, images, tmp, args)
        print(f"n={small['n']:>7}: peak RSS {small['peak_rss_mb']:.0f} MB, {small['seconds']:.0f}s "
              f"({small['images_per_s']:.0f} img/s), {small['shards']} shards", flush=True)
        large = measure(args.large, images, tmp, args)
        print(f"n={large['n']:>7}: peak RSS {large['peak_rss_mb']:.0f} MB, {large['seconds']:.0f}s "
              f"({large['images_per_s']:.0f} img/s), {large['shards']} shards", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    diff = large["peak_rss_mb"] - small["peak_rss_mb"]
    print(f"growth from {args.small} to {args.large} images: {diff:+.0f} MB "
          f"({large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x); total {time.perf_counter() - t0:.0f}s")
    res = {"small": small, "large": large, "growth_mb": diff, "settings": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
