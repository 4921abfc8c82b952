"""Extraction speed, side by side in one run, on the same real images.

Measures images/s of:

  (a) naive   - the loop people write today: one image at a time, full PIL decode,
                resize + crop, eager PyTorch forward, pool (as in Caffe/Keras scripts);
  (b) torch   - `deepfeat extract` with the torch backend (parallel draft decode,
                batched eager inference, sharded store);
  (c) onnx    - `deepfeat extract --backend onnx`;

plus the components: decode-only throughput (the same decode workers, no model), and
model-only throughput on pre-decoded batches for both backends. The "bound" is what
decode + inference cost allows when both share the machine's cores:
1 / (1/decode_rate + 1/model_rate); the pipeline's efficiency is its rate over that.

    python benchmarks/bench_extract.py --images ../shared/data/flowers17 --n 640

Prints a table with ratios to (a) and writes JSON (default bench-out/extract.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def naive_loop(paths: list[str], layer: str, pool: str) -> float:
    """(a): the classic per-image script. Returns images/s."""
    import torch
    from PIL import Image

    import deepfeat
    from deepfeat.pooling import get_pooling
    from deepfeat.taps import Taps

    model = deepfeat.load_model("efficientnet_lite0")
    cfg = model.data_config
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    taps = Taps(model.net, [layer])
    pooling = get_pooling(pool)
    size = int(cfg.input_size[0] / cfg.crop_pct)
    t0 = time.perf_counter()
    for p in paths:
        img = Image.open(p).convert("RGB")  # full-resolution decode
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
        left, top = (img.width - 224) // 2, (img.height - 224) // 2
        img = img.crop((left, top, left + 224, top + 224))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = ((x - mean) / std)[None]
        with torch.no_grad():  # eager, batch size 1, the whole network
            feats = taps(x)
            pooling(feats[layer]).numpy()
    return len(paths) / (time.perf_counter() - t0)


def _decode_chunk(args):
    from deepfeat.images import decode_image
    from deepfeat.preprocess import SizePolicy

    paths, cfg = args
    for p in paths:
        decode_image(p, SizePolicy("model"), cfg)
    return len(paths)


def decode_only(paths: list[str], workers: int) -> float:
    """Decode throughput with the pipeline's decoder (draft + resize + crop) on all workers."""
    import multiprocessing as mp

    import deepfeat

    cfg = deepfeat.load_model("efficientnet_lite0").data_config
    chunks = [paths[i:: workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_decode_chunk, [(paths[:workers], cfg)] * workers))  # warm the workers
        t0 = time.perf_counter()
        n = sum(ex.map(_decode_chunk, [(c, cfg) for c in chunks]))
    return n / (time.perf_counter() - t0)


def model_only(backend: str, layer: str, pool: str, batch: int, reps: int) -> float:
    import torch

    import deepfeat
    from deepfeat.features import FeatureNet, OnnxRunner, TorchRunner
    from deepfeat.pooling import get_pooling

    model = deepfeat.load_model("efficientnet_lite0")
    fnet = FeatureNet(model, [layer], get_pooling(pool))
    runner = OnnxRunner(fnet, batch_size=batch) if backend == "onnx" else TorchRunner(fnet, torch.device("cpu"))
    x = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    runner(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        runner(x)
    return reps * batch / (time.perf_counter() - t0)


def pipeline(paths_file: str, backend: str, layer: str, pool: str, batch: int, workers: int) -> dict:
    from deepfeat.pipeline import ExtractConfig, extract

    out = tempfile.mkdtemp(prefix=f"bench-{backend}-")
    try:
        cfg = ExtractConfig(inputs=[f"@{paths_file}"], output=out, layers=[layer], pooling=pool, backend=backend,
                            batch_size=batch, workers=workers, progress="none")
        rep = extract(cfg)
        # steady state: after the first batch (model load, worker start and the one-off ONNX
        # export are reported apart, as warm-up)
        return {"images_per_s": rep.steady_images_per_s, "end_to_end_images_per_s": rep.images_per_s,
                "seconds": rep.seconds, "warmup_seconds": rep.warmup_seconds, "stages": rep.stage_seconds,
                "ok": rep.ok}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers17"))
    ap.add_argument("--n", type=int, default=640, help="number of images (default 640)")
    ap.add_argument("--naive-n", type=int, default=None, help="images for the slow naive loop (default n/4)")
    ap.add_argument("--layer", default="bn2")
    ap.add_argument("--pool", default="gem")
    ap.add_argument("--batch-size", type=int, default=8, help="batch size (deepfeat's CPU default: 8)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="bench-out/extract.json")
    args = ap.parse_args()

    from deepfeat.images import discover

    if not Path(args.images).is_dir():
        print(f"image folder not found: {args.images}", file=sys.stderr)
        return 2
    paths = discover([args.images])[: args.n]
    naive_paths = paths[: args.naive_n or max(16, len(paths) // 4)]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(os.path.abspath(p) for p in paths) + "\n")
        listing = f.name
    print(f"{len(paths)} images from {args.images}; {os.cpu_count()} cores; layer {args.layer}, pool {args.pool}",
          file=sys.stderr)
    res: dict = {}
    res["naive"] = naive_loop(naive_paths, args.layer, args.pool)
    res["decode_only"] = decode_only(paths, args.workers)
    res["model_torch"] = model_only("torch", args.layer, args.pool, args.batch_size, 4)
    res["model_onnx"] = model_only("onnx", args.layer, args.pool, args.batch_size, 4)
    res["pipeline_torch"] = pipeline(listing, "torch", args.layer, args.pool, args.batch_size, args.workers)
    res["pipeline_onnx"] = pipeline(listing, "onnx", args.layer, args.pool, args.batch_size, args.workers)
    os.unlink(listing)

    naive = res["naive"]
    rows = [
        ("(a) naive loop (bs 1, full decode, eager)", naive),
        ("(b) deepfeat extract --backend torch", res["pipeline_torch"]["images_per_s"]),
        ("(c) deepfeat extract --backend onnx", res["pipeline_onnx"]["images_per_s"]),
        ("decode only (draft, all workers)", res["decode_only"]),
        ("model only, torch (pre-decoded)", res["model_torch"]),
        ("model only, onnx (pre-decoded)", res["model_onnx"]),
    ]
    # decode and inference share the cores: each image costs 1/decode + 1/model seconds of the
    # whole machine (the bound when both saturate every core); with perfect overlap on idle
    # cycles the limit would be the slower stage, min(decode, model)
    bound = {b: 1.0 / (1.0 / res["decode_only"] + 1.0 / res[f"model_{b}"]) for b in ("torch", "onnx")}
    overlap = {b: min(res["decode_only"], res[f"model_{b}"]) for b in ("torch", "onnx")}
    print(f"\n{'what':45s} {'img/s':>8s} {'vs (a)':>7s}   (pipelines: steady state after the first batch)")
    for name, v in rows:
        print(f"{name:45s} {v:8.1f} {v / naive:6.2f}x")
    for b in ("torch", "onnx"):
        r = res[f"pipeline_{b}"]
        eff = r["images_per_s"] / bound[b]
        print(f"pipeline {b}: shared-cores bound {bound[b]:.1f} img/s (efficiency {eff:.0%}), perfect-overlap bound "
              f"{overlap[b]:.1f} img/s ({r['images_per_s'] / overlap[b]:.0%}); end to end "
              f"{r['end_to_end_images_per_s']:.1f} img/s with {r['warmup_seconds']:.1f}s warm-up; stages {r['stages']}")
    res["bound"] = bound
    res["overlap_bound"] = overlap
    res["ratios_vs_naive"] = {name: v / naive for name, v in rows}
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                      "n_images": len(paths), "naive_n": len(naive_paths)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
