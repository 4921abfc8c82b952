"""Extraction speed, side by side in one run, on the same real images.

Measures images/s of:

  (a) naive   - the loop people write today: one image at a time, full PIL decode,
                resize (+ crop), eager PyTorch forward, pool (as in Caffe/Keras scripts),
                at the same size policy and scales as the pipelines;
  (b) torch   - `deepfeat extract` with the torch backend (parallel draft decode,
                batched eager inference, sharded store);
  (c) onnx    - `deepfeat extract --backend onnx` (aspect-preserving policies and
                --scales: one dynamic-shape graph);
  (d) auto    - `deepfeat extract` as it runs by default (--policy other than model only);

plus the components: decode-only throughput (the same decode workers, no model), and
model-only throughput on the same images pre-decoded, batched as the pipeline batches them,
with the same threads. Model-only is the **limit** of a pipeline (it runs the same inference
and must also decode): the pipeline's "% of limit" is its rate over it. Also printed, for
reference: 1 / (1/decode + 1/model), what the two stages allow if each needs all cores.

    python benchmarks/bench_extract.py --images ../shared/data/flowers17 --n 640
    python benchmarks/bench_extract.py --policy long:512 --n 320
    python benchmarks/bench_extract.py --policy long:512 --scales 1,0.707,0.5 --n 160

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


def naive_loop(paths: list[str], layer: str, pool: str, policy: str = "model", scales=(1.0,)) -> float:
    """(a): the classic per-image script, at *policy* and *scales*. Returns images/s."""
    import torch
    from PIL import Image

    import deepfeat
    from deepfeat.pooling import get_pooling, rescale
    from deepfeat.taps import Taps

    model = deepfeat.load_model("efficientnet_lite0")
    cfg = model.data_config
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    taps = Taps(model.net, [layer])
    pooling = get_pooling(pool)
    kind, _, side = policy.partition(":")
    size = int(cfg.input_size[0] / cfg.crop_pct) if kind == "model" else int(side)
    with torch.no_grad():  # the process's first forward (thread pools, kernel set-up: seconds) is not
        taps(torch.zeros(1, 3, 64, 64))  # per-image work, as the pipelines' warm-up is not: keep it out
    t0 = time.perf_counter()
    for p in paths:
        img = Image.open(p).convert("RGB")  # full-resolution decode
        w, h = img.size
        s = size / (max(w, h) if kind == "long" else min(w, h))
        img = img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
        if kind == "model":
            left, top = (img.width - 224) // 2, (img.height - 224) // 2
            img = img.crop((left, top, left + 224, top + 224))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        x = ((x - mean) / std)[None]
        with torch.no_grad():  # eager, batch size 1, the whole network
            if tuple(scales) == (1.0,):
                pooling(taps(x)[layer]).numpy()
            else:
                pooling.multiscale([taps(rescale(x, sc))[layer] for sc in scales]).numpy()
    return len(paths) / (time.perf_counter() - t0)


def _decode_chunk(args):
    from deepfeat.images import decode_image
    from deepfeat.preprocess import parse_size_policy

    paths, cfg, policy = args
    for p in paths:
        decode_image(p, parse_size_policy(policy), cfg)
    return len(paths)


def decode_only(paths: list[str], workers: int, policy: str = "model") -> float:
    """Decode throughput with the pipeline's decoder (draft + resize (+ crop)) on all workers."""
    import multiprocessing as mp

    import deepfeat

    cfg = deepfeat.load_model("efficientnet_lite0").data_config
    chunks = [paths[i:: workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_decode_chunk, [(paths[:workers], cfg, policy)] * workers))  # warm the workers
        t0 = time.perf_counter()
        n = sum(ex.map(_decode_chunk, [(c, cfg, policy) for c in chunks]))
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


def model_only_images(backend: str, paths: list[str], layer: str, pool: str, policy: str, scales, batch: int,
                      threads: int) -> dict:
    """Model-only on the real images pre-decoded, batched as the pipeline batches them (one shape per
    batch, CPU_BATCH_PIXELS), with the pipeline's threads: the limit of a pipeline run."""
    import torch

    import deepfeat
    from deepfeat.features import FeatureNet, OnnxRunner, TorchRunner
    from deepfeat.images import decode_image
    from deepfeat.pipeline import CPU_BATCH_PIXELS, shard_batches
    from deepfeat.pooling import get_pooling
    from deepfeat.preprocess import parse_size_policy

    model = deepfeat.load_model("efficientnet_lite0")
    fnet = FeatureNet(model, [layer], get_pooling(pool), scales)
    pol = parse_size_policy(policy)
    pixels = [decode_image(p, pol, model.data_config).pixels for p in paths]
    items = [(i, "") for i in range(len(pixels))]
    batches, _ = shard_batches(items, pol, batch, [px.shape[:2] for px in pixels], CPU_BATCH_PIXELS)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if backend == "onnx":
            runner = OnnxRunner(fnet, threads=threads, batch_size=batch, export="static" if pol.fixed else "dynamic")
        else:
            runner = TorchRunner(fnet, torch.device("cpu"))
        t0 = time.perf_counter()
        runner(np.stack([pixels[i] for i, _ in batches[0]]))  # the export (ONNX), apart
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in batches:
            runner(np.stack([pixels[i] for i, _ in b]))
        rate = len(pixels) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {"images_per_s": rate, "warmup_seconds": warm, "batches": len(batches),
            "shapes": len({px.shape for px in pixels})}


def pipeline(paths_file: str, backend: str, layer: str, pool: str, batch: int | None, workers: int | None,
             policy: str = "model", scales=(1.0,), threads: int | None = None) -> dict:
    from deepfeat.pipeline import ExtractConfig, extract

    out = tempfile.mkdtemp(prefix=f"bench-{backend}-")
    try:
        cfg = ExtractConfig(inputs=[f"@{paths_file}"], output=out, layers=[layer], pooling=pool, backend=backend,
                            batch_size=batch, workers=workers, progress="none", size=policy, scales=tuple(scales),
                            threads=threads)
        rep = extract(cfg)
        # steady state: after the first batch (model load, worker start and the one-off ONNX
        # export are reported apart, as warm-up)
        return {"images_per_s": rep.steady_images_per_s, "end_to_end_images_per_s": rep.images_per_s,
                "seconds": rep.seconds, "warmup_seconds": rep.warmup_seconds, "stages": rep.stage_seconds,
                "ok": rep.ok, "backend": rep.backend}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers17"))
    ap.add_argument("--n", type=int, default=640, help="number of images (default 640)")
    ap.add_argument("--naive-n", type=int, default=None, help="images for the slow naive loop (default n/4)")
    ap.add_argument("--layer", default="bn2")
    ap.add_argument("--pool", default="gem")
    ap.add_argument("--policy", default="model", help="size policy: model (224 crops), long:512, long:1024, ...")
    ap.add_argument("--scales", default="1", help="multi-scale factors, e.g. 1,0.707,0.5")
    ap.add_argument("--batch-size", type=int, default=8, help="batch size (deepfeat's CPU default: 8)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: deepfeat's)")
    ap.add_argument("--threads", type=int, default=None, help="inference threads (default: deepfeat's)")
    ap.add_argument("--no-torch-pipeline", action="store_true", help="skip (b), the slow torch pipeline")
    ap.add_argument("--rounds", type=int, default=1,
                    help="R > 1: after the table, R interleaved rounds of (a) naive, (d) the default pipeline and "
                         "the model-only limit, each round's ratios taken within the round; the medians are "
                         "printed (robust to a machine whose load changes during the run)")
    ap.add_argument("--out", default="bench-out/extract.json")
    args = ap.parse_args()

    from deepfeat.features import parse_scales
    from deepfeat.images import discover
    from deepfeat.onnx_runtime import default_threads, work_pixels

    if not Path(args.images).is_dir():
        print(f"image folder not found: {args.images}", file=sys.stderr)
        return 2
    scales = parse_scales(args.scales)
    d_threads, d_workers = default_threads(pixels=work_pixels(args.policy, scales))
    threads = args.threads or d_threads
    workers = args.workers if args.workers is not None else d_workers
    fixed = args.policy == "model" or args.policy.startswith("warp")
    paths = discover([args.images])[: args.n]
    naive_paths = paths[: args.naive_n or max(16, len(paths) // 4)]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(os.path.abspath(p) for p in paths) + "\n")
        listing = f.name
    print(f"{len(paths)} images from {args.images}; {os.cpu_count()} cores; layer {args.layer}, pool {args.pool}, "
          f"size {args.policy}, scales {','.join(map(str, scales))}; {threads} inference threads, {workers} decode "
          "workers", file=sys.stderr)
    res: dict = {"policy": args.policy, "scales": list(scales), "threads": threads, "workers": workers}
    res["naive"] = naive_loop(naive_paths, args.layer, args.pool, args.policy, scales)
    res["decode_only"] = decode_only(paths, max(1, workers), args.policy)
    if fixed and scales == (1.0,):
        res["model_torch"] = model_only("torch", args.layer, args.pool, args.batch_size, 4)
        res["model_onnx"] = model_only("onnx", args.layer, args.pool, args.batch_size, 4)
    else:  # the real shapes, pre-decoded, batched as the pipeline does
        for b in ("onnx", "torch"):
            r = model_only_images(b, paths, args.layer, args.pool, args.policy, scales, args.batch_size, threads)
            res[f"model_{b}"] = r["images_per_s"]
            res[f"model_{b}_detail"] = r
    batch = args.batch_size if fixed else None  # aspect-preserving: deepfeat's default batching
    common = dict(policy=args.policy, scales=scales, threads=args.threads)
    if not args.no_torch_pipeline:
        res["pipeline_torch"] = pipeline(listing, "torch", args.layer, args.pool, batch, args.workers, **common)
    res["pipeline_onnx"] = pipeline(listing, "onnx", args.layer, args.pool, batch, args.workers, **common)
    if not fixed or scales != (1.0,):
        res["pipeline_auto"] = pipeline(listing, "auto", args.layer, args.pool, batch, args.workers, **common)
    os.unlink(listing)

    naive = res["naive"]
    rows = [("(a) naive loop (bs 1, full decode, eager)", naive)]
    if "pipeline_torch" in res:
        rows.append(("(b) deepfeat extract --backend torch", res["pipeline_torch"]["images_per_s"]))
    rows.append(("(c) deepfeat extract --backend onnx", res["pipeline_onnx"]["images_per_s"]))
    if "pipeline_auto" in res:
        rows.append((f"(d) deepfeat extract (auto: {res['pipeline_auto']['backend']})",
                     res["pipeline_auto"]["images_per_s"]))
    rows += [
        (f"decode only ({workers} workers)", res["decode_only"]),
        ("model only, torch (pre-decoded)", res["model_torch"]),
        ("model only, onnx (pre-decoded) = the limit", res["model_onnx"]),
    ]
    limit = {b: res[f"model_{b}"] for b in ("torch", "onnx")}
    shared = {b: 1.0 / (1.0 / res["decode_only"] + 1.0 / res[f"model_{b}"]) for b in ("torch", "onnx")}
    print(f"\n{'what':48s} {'img/s':>8s} {'vs (a)':>7s}   (pipelines: steady state after the first batch)")
    for name, v in rows:
        print(f"{name:48s} {v:8.2f} {v / naive:6.2f}x")
    for key, b in (("pipeline_torch", "torch"), ("pipeline_onnx", "onnx"), ("pipeline_auto", "onnx")):
        if key not in res:
            continue
        r = res[key]
        if key == "pipeline_auto" and r["backend"] != "onnx":
            b = r["backend"]
        print(f"{key}: {r['images_per_s'] / limit[b]:.0%} of the {b} model-only limit {limit[b]:.1f} img/s "
              f"({r['images_per_s'] / shared[b]:.0%} of 1/(1/decode + 1/model) = {shared[b]:.1f}); end to end "
              f"{r['end_to_end_images_per_s']:.1f} img/s with {r['warmup_seconds']:.1f}s warm-up; stages {r['stages']}")
    res["limit"] = limit
    res["shared_cores_bound"] = shared
    res["ratios_vs_naive"] = {name: v / naive for name, v in rows}
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                      "n_images": len(paths), "naive_n": len(naive_paths)}
    if args.rounds > 1:
        res["rounds"] = interleaved_rounds(args, listing_paths=paths, naive_paths=naive_paths, scales=scales,
                                           threads=threads, fixed=fixed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def interleaved_rounds(args, listing_paths: list[str], naive_paths: list[str], scales, threads: int,
                       fixed: bool) -> dict:
    """R rounds of naive -> default pipeline -> model-only limit, back to back; ratios within each round.

    On a shared machine the load can change several-fold between the steps of one table; a ratio
    whose two terms were measured seconds apart, repeated R times, and its median, is the figure
    to trust."""
    backend = "onnx" if fixed else "auto"
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(os.path.abspath(p) for p in listing_paths) + "\n")
        listing = f.name
    rounds = []
    try:
        for r in range(args.rounds):
            naive = naive_loop(naive_paths, args.layer, args.pool, args.policy, scales)
            pipe = pipeline(listing, backend, args.layer, args.pool, args.batch_size if fixed else None,
                            args.workers, policy=args.policy, scales=scales, threads=args.threads)
            if fixed and scales == (1.0,):
                limit = model_only("onnx", args.layer, args.pool, args.batch_size, 4)
            else:
                limit = model_only_images("onnx", listing_paths, args.layer, args.pool, args.policy, scales,
                                          args.batch_size, threads)["images_per_s"]
            row = {"naive": naive, "pipeline": pipe["images_per_s"], "limit": limit,
                   "pipeline_vs_naive": pipe["images_per_s"] / naive, "pipeline_vs_limit": pipe["images_per_s"] / limit,
                   "load_average": os.getloadavg()[0]}
            rounds.append(row)
            print(f"round {r + 1}: naive {naive:.2f}, pipeline ({backend}) {pipe['images_per_s']:.2f}, limit "
                  f"{limit:.2f} img/s: {row['pipeline_vs_naive']:.2f}x the naive loop, "
                  f"{row['pipeline_vs_limit']:.0%} of the limit (load {row['load_average']:.1f})", flush=True)
    finally:
        os.unlink(listing)
    med = {k: float(np.median([r[k] for r in rounds])) for k in ("pipeline_vs_naive", "pipeline_vs_limit")}
    print(f"median of {len(rounds)} rounds: {med['pipeline_vs_naive']:.2f}x the naive loop, "
          f"{med['pipeline_vs_limit']:.0%} of the limit")
    return {"backend": backend, "rounds": rounds, "median": med}


if __name__ == "__main__":
    sys.exit(main())
