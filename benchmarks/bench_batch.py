"""Batch size against input size on the CPU: is exact-shape bucketing (small batches) a cost?

Aspect-preserving size policies (``long:512``, ``short:S``) give images of many shapes,
and deepfeat batches only images of exactly the same shape (no padding, so no border
effects). On a heterogeneous collection that means small batches. This measures, side
by side in one run, what batch size is worth on this machine:

1. model only (eager PyTorch, the backend used for aspect-preserving policies on the
   CPU): images/s of the tapped network on random tensors for each input size and batch
   size, with the ratio to batch 1;
2. end to end (optional, ``--images DIR``): ``deepfeat extract DIR --size POLICY
   --backend torch`` with deepfeat's default batching (at most 8 images and
   ``CPU_BATCH_PIXELS`` pixels per batch) and with ``--batch-size 8`` (8 images whatever
   their size, the default before the pixel cap), alternated ``--repeat`` times,
   images/s after the first batch.

    python benchmarks/bench_batch.py
    python benchmarks/bench_batch.py --images ../shared/data/flowers17 --policy long:512 --limit 400

Writes JSON (default bench-out/batch.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = [(224, 224), (288, 384), (384, 512), (768, 1024)]
BATCHES = [1, 2, 4, 8]


def model_only(spec: str, layer: str, seconds: float, max_pixels: int) -> list[dict]:
    import torch

    import deepfeat
    from deepfeat.models.taps import make_taps

    model = deepfeat.load_model(spec)
    taps = make_taps(model, [layer])
    rows = []
    for h, w in SIZES:
        row = {"size": f"{h}x{w}", "img_per_s": {}}
        for bs in BATCHES:
            if bs * h * w > max_pixels:
                continue
            x = torch.randn(bs, 3, h, w)
            with torch.inference_mode():
                taps(x)  # warm-up
                t0, n = time.perf_counter(), 0
                while time.perf_counter() - t0 < seconds:
                    taps(x)
                    n += bs
            row["img_per_s"][bs] = n / (time.perf_counter() - t0)
        rows.append(row)
        base = row["img_per_s"][1]
        cells = "  ".join(f"b{bs} {v:6.2f} ({v / base:4.2f}x)" for bs, v in row["img_per_s"].items())
        print(f"{row['size']:>9}  {cells}", flush=True)
    return rows


def end_to_end(args) -> list[dict]:
    runs = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    try:
        for r in range(args.repeat):
            for bs in ("default", "8"):
                out = tmp / f"s{bs}"
                cmd = [sys.executable, "-m", "deepfeat.cli", "extract", args.images, "-o", str(out), "--size",
                       args.policy, "--backend", "torch", "--progress", "none", "--layer", args.layer]
                cmd += (["--limit", str(args.limit)] if args.limit else []) + \
                    (["--batch-size", bs] if bs != "default" else [])
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise SystemExit(f"extract failed:\n{res.stderr[-2000:]}")
                m = re.search(r"\(([\d.]+) img/s, ([\d.]+) after the first batch\)", res.stdout + res.stderr)
                rate = float(m.group(2)) if m else float("nan")
                runs.append({"repeat": r, "batch_size": bs, "img_per_s_after_first_batch": rate})
                print(f"  run {r}: batch {bs}: {rate:.2f} img/s", flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in range(args.repeat):
        auto, b8 = (x["img_per_s_after_first_batch"] for x in runs if x["repeat"] == r)
        print(f"  run {r}: default batching / --batch-size 8 = {auto / b8:.2f}x")
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--layer", default="bn2")
    ap.add_argument("--seconds", type=float, default=6.0, help="per model-only cell")
    ap.add_argument("--max-pixels", type=int, default=8 * 384 * 512, help="skip larger batch x size cells")
    ap.add_argument("--images", help="a folder for the end-to-end comparison")
    ap.add_argument("--policy", default="long:512")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default="bench-out/batch.json")
    args = ap.parse_args()
    import torch

    print(f"model only: {args.model} up to {args.layer}, eager torch, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores")
    report = {"model": args.model, "layer": args.layer, "threads": torch.get_num_threads(),
              "model_only": model_only(args.model, args.layer, args.seconds, args.max_pixels)}
    if args.images:
        print(f"end to end: deepfeat extract {args.images} --size {args.policy} --backend torch (limit {args.limit})")
        report["end_to_end"] = {"policy": args.policy, "limit": args.limit, "runs": end_to_end(args)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
