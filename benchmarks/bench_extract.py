"""Extraction speed, side by side in one run, on the same real images.

Measures images/s of:

  (a) naive   - the loop people write today: one image at a time, full PIL decode,
                resize (+ crop), eager PyTorch forward, pool (as in Caffe/Keras scripts),
                at the same size policy and scales as the pipelines;
  (b) torch   - `deepfeat extract` with the torch backend (parallel draft decode,
                batched eager inference, sharded store);
  (c) onnx    - `deepfeat extract --backend onnx` (aspect-preserving policies and
                --scales: one dynamic-shape graph);
  (d) auto    - `deepfeat extract` as it runs by default (OpenVINO where installed for
                aspect-preserving sizes and --scales, else ONNX Runtime);
  (e) openvino - `deepfeat extract --backend openvino` (when OpenVINO is installed);

plus the components: decode-only throughput (the same decode workers, no model), and
model-only throughput on the same images pre-decoded, batched as the pipeline batches them,
with the same threads, per engine (torch, ONNX Runtime, OpenVINO). Model-only is the **limit**
of a pipeline (it runs the same inference and must also decode): the pipeline's "% of limit"
is its rate over the model-only rate of the engine it used. Also printed, for reference:
1 / (1/decode + 1/model), what the two stages allow if each needs all cores.

--precision bf16 runs (d), (e) and the OpenVINO model-only row in bf16 (ONNX Runtime, torch and
the naive loop stay float32). --rounds R then interleaves R rounds of the naive loop, the
pipeline of --backend (auto by default), the ONNX Runtime pipeline (a row kept for comparison)
and the model-only limit of the engine --backend ran on, and prints medians of within-round ratios.

Every measurement runs in a process of its own (:func:`isolated`): once ONNX Runtime, OpenVINO
and PyTorch have each run in one process, their idle thread pools slow whichever runs next
(measured: a naive loop after both ran at 0.4 img/s instead of 2.5), so sharing a process would
bias every ratio by the order of the steps.

    python benchmarks/bench_extract.py --images ../shared/data/flowers17 --n 640
    python benchmarks/bench_extract.py --policy long:512 --n 320
    python benchmarks/bench_extract.py --policy long:512 --scales 1,0.707,0.5 --n 160
    python benchmarks/bench_extract.py --policy long:512 --n 40 --naive-n 10 --rounds 3 --precision bf16

Prints a table with ratios to (a) and writes JSON (default bench-out/extract.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
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
    from deepfeat.models.taps import Taps
    from deepfeat.pooling import get_pooling, rescale

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
    from deepfeat.data.images import decode_image
    from deepfeat.data.preprocess import parse_size_policy

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


def _runner(backend: str, fnet, threads: int | None, batch: int | None, export: str, precision: str = "f32"):
    import torch

    from deepfeat.backends.featurenet import OnnxRunner, TorchRunner

    if backend == "onnx":
        return OnnxRunner(fnet, threads=threads, batch_size=batch, export=export)
    if backend == "openvino":
        from deepfeat.backends.openvino_runtime import OpenVinoRunner

        return OpenVinoRunner(fnet, threads=threads, batch_size=batch, export=export, precision=precision)
    return TorchRunner(fnet, torch.device("cpu"))


def model_only(backend: str, layer: str, pool: str, batch: int, reps: int, threads: int | None = None,
               precision: str = "f32") -> float:
    import deepfeat
    from deepfeat.backends.featurenet import FeatureNet
    from deepfeat.pooling import get_pooling

    model = deepfeat.load_model("efficientnet_lite0")
    fnet = FeatureNet(model, [layer], get_pooling(pool))
    runner = _runner(backend, fnet, threads, batch, "static", precision)
    x = np.random.default_rng(0).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8)
    runner(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        runner(x)
    return reps * batch / (time.perf_counter() - t0)


def model_only_images(backend: str, paths: list[str], layer: str, pool: str, policy: str, scales, batch: int,
                      threads: int, precision: str = "f32") -> dict:
    """Model-only on the real images pre-decoded, batched as the pipeline batches them (one shape per
    batch, CPU_BATCH_PIXELS), with the pipeline's threads: the limit of a pipeline run."""
    import torch

    import deepfeat
    from deepfeat.backends.featurenet import FeatureNet
    from deepfeat.data.images import decode_image
    from deepfeat.data.preprocess import parse_size_policy
    from deepfeat.pipeline import CPU_BATCH_PIXELS, shard_batches
    from deepfeat.pooling import get_pooling

    model = deepfeat.load_model("efficientnet_lite0")
    fnet = FeatureNet(model, [layer], get_pooling(pool), scales)
    pol = parse_size_policy(policy)
    pixels = [decode_image(p, pol, model.data_config).pixels for p in paths]
    items = [(i, "") for i in range(len(pixels))]
    batches, _ = shard_batches(items, pol, batch, [px.shape[:2] for px in pixels], CPU_BATCH_PIXELS)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runner = _runner(backend, fnet, threads, batch, "static" if pol.fixed else "dynamic", precision)
        t0 = time.perf_counter()
        runner(np.stack([pixels[i] for i, _ in batches[0]]))  # the export (ONNX, OpenVINO), apart
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
             policy: str = "model", scales=(1.0,), threads: int | None = None, precision: str = "f32") -> dict:
    from deepfeat.pipeline import ExtractConfig, extract

    out = tempfile.mkdtemp(prefix=f"bench-{backend}-")
    try:
        cfg = ExtractConfig(inputs=[f"@{paths_file}"], output=out, layers=[layer], pooling=pool, backend=backend,
                            batch_size=batch, workers=workers, progress="none", size=policy, scales=tuple(scales),
                            threads=threads, precision=precision)
        rep = extract(cfg)
        # steady state: after the first batch (model load, worker start and the one-off ONNX
        # export are reported apart, as warm-up)
        return {"images_per_s": rep.steady_images_per_s, "end_to_end_images_per_s": rep.images_per_s,
                "seconds": rep.seconds, "warmup_seconds": rep.warmup_seconds, "stages": rep.stage_seconds,
                "ok": rep.ok, "backend": rep.backend}
    finally:
        shutil.rmtree(out, ignore_errors=True)


STEPS = {"naive_loop": naive_loop, "decode_only": decode_only, "model_only": model_only,
         "model_only_images": model_only_images, "pipeline": pipeline}


def isolated(step: str, *args, **kwargs):
    """``STEPS[step](*args, **kwargs)`` in a fresh Python process; its result (JSON) is returned."""
    spec = json.dumps({"step": step, "args": args, "kwargs": kwargs})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--step", spec], check=False,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step {step} failed (exit {proc.returncode}); its messages are above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_step(spec: str) -> int:
    """The child side of :func:`isolated`: run one step, print its result as the last line."""
    s = json.loads(spec)
    print(json.dumps(STEPS[s["step"]](*s["args"], **s["kwargs"])), flush=True)
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--step":
        return run_step(sys.argv[2])
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
    ap.add_argument("--backend", default="auto", choices=["auto", "onnx", "openvino"],
                    help="the pipeline of the interleaved rounds, whose model-only limit is measured with the engine "
                         "it ran on (default auto)")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16"],
                    help="precision of the OpenVINO rows and of auto (default f32)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="R > 1: after the table, R interleaved rounds of (a) naive, the --backend pipeline, the ONNX "
                         "Runtime pipeline and the model-only limits, each round's ratios taken within the round; "
                         "the medians are printed (robust to a machine whose load changes during the run)")
    ap.add_argument("--no-table", action="store_true", help="skip the table of every row (with --rounds: rounds only)")
    ap.add_argument("--out", default="bench-out/extract.json")
    args = ap.parse_args()

    from deepfeat.backends.onnx_runtime import default_threads, work_pixels
    from deepfeat.backends.openvino_setup import available
    from deepfeat.data.images import discover
    from deepfeat.specs import parse_scales

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
    engines = ["torch", "onnx"] + (["openvino"] if available() else [])
    print(f"{len(paths)} images from {args.images}; {os.cpu_count()} cores; layer {args.layer}, pool {args.pool}, "
          f"size {args.policy}, scales {','.join(map(str, scales))}; {threads} inference threads, {workers} decode "
          f"workers; precision {args.precision}; load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    res: dict = {"policy": args.policy, "scales": list(scales), "threads": threads, "workers": workers,
                 "precision": args.precision, "load_average_start": os.getloadavg()[0]}
    if not args.no_table:
        table(args, res, paths, naive_paths, scales, threads, workers, fixed, engines)
        report(res, workers, engines)
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                      "n_images": len(paths), "naive_n": len(naive_paths)}
    if args.rounds > 1:
        res["rounds"] = interleaved_rounds(args, listing_paths=paths, naive_paths=naive_paths, scales=scales,
                                           threads=threads, fixed=fixed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def table(args, res: dict, paths: list[str], naive_paths: list[str], scales, threads: int, workers: int,
          fixed: bool, engines: list[str]) -> None:
    """One of each row, into *res*: the naive loop, decode only, each engine's model-only limit, each pipeline."""
    res["naive"] = isolated("naive_loop", naive_paths, args.layer, args.pool, args.policy, scales)
    res["decode_only"] = isolated("decode_only", paths, max(1, workers), args.policy)
    for b in engines:
        prec = args.precision if b == "openvino" else "f32"
        if fixed and scales == (1.0,):
            res[f"model_{b}"] = isolated("model_only", b, args.layer, args.pool, args.batch_size, 4, threads, prec)
        else:  # the real shapes, pre-decoded, batched as the pipeline does
            r = isolated("model_only_images", b, paths, args.layer, args.pool, args.policy, scales,
                         args.batch_size, threads, prec)
            res[f"model_{b}"] = r["images_per_s"]
            res[f"model_{b}_detail"] = r
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(os.path.abspath(p) for p in paths) + "\n")
        listing = f.name
    batch = args.batch_size if fixed else None  # aspect-preserving: deepfeat's default batching
    common = dict(policy=args.policy, scales=scales, threads=args.threads)
    try:
        for b in (["auto", "onnx"] if args.no_torch_pipeline else ["torch", "auto", "onnx"]) + engines[2:]:
            prec = args.precision if b in ("auto", "openvino") else "f32"
            res[f"pipeline_{b}"] = isolated("pipeline", listing, b, args.layer, args.pool, batch, args.workers,
                                            precision=prec, **common)
    finally:
        os.unlink(listing)


def report(res: dict, workers: int, engines: list[str]) -> None:
    """Print the table (ratios to the naive loop) and each pipeline against its engine's limit."""
    naive = res["naive"]
    bf = " bf16" if res["precision"] == "bf16" else ""
    rows = [("(a) naive loop (bs 1, full decode, eager)", naive)]
    names = {"torch": "(b) deepfeat extract --backend torch", "onnx": "(c) deepfeat extract --backend onnx",
             "auto": f"(d) deepfeat extract{bf} (auto: {res['pipeline_auto']['backend']})",
             "openvino": f"(e) deepfeat extract --backend openvino{bf}"}
    rows += [(names[b], res[f"pipeline_{b}"]["images_per_s"]) for b in ("torch", "onnx", "auto", "openvino")
             if f"pipeline_{b}" in res]
    rows.append((f"decode only ({workers} workers)", res["decode_only"]))
    rows += [(f"model only, {b}{bf if b == 'openvino' else ''} (pre-decoded)", res[f"model_{b}"]) for b in engines]
    limit = {b: res[f"model_{b}"] for b in engines}
    shared = {b: 1.0 / (1.0 / res["decode_only"] + 1.0 / v) for b, v in limit.items()}
    print(f"\n{'what':52s} {'img/s':>8s} {'vs (a)':>7s}   (pipelines: steady state after the first batch)")
    for name, v in rows:
        print(f"{name:52s} {v:8.2f} {v / naive:6.2f}x")
    for key in ("pipeline_torch", "pipeline_onnx", "pipeline_auto", "pipeline_openvino"):
        if key not in res:
            continue
        r = res[key]
        b = r["backend"]
        print(f"{key}: {r['images_per_s'] / limit[b]:.0%} of the {b} model-only limit {limit[b]:.1f} img/s "
              f"({r['images_per_s'] / shared[b]:.0%} of 1/(1/decode + 1/model) = {shared[b]:.1f}); end to end "
              f"{r['end_to_end_images_per_s']:.1f} img/s with {r['warmup_seconds']:.1f}s warm-up; stages {r['stages']}")
    res["limit"] = limit
    res["shared_cores_bound"] = shared
    res["ratios_vs_naive"] = {name: v / naive for name, v in rows}


def _limit(engine: str, args, paths: list[str], scales, threads: int, fixed: bool) -> float:
    prec = args.precision if engine == "openvino" else "f32"
    if fixed and scales == (1.0,):
        return isolated("model_only", engine, args.layer, args.pool, args.batch_size, 4, threads, prec)
    return isolated("model_only_images", engine, paths, args.layer, args.pool, args.policy, scales, args.batch_size,
                    threads, prec)["images_per_s"]


def interleaved_rounds(args, listing_paths: list[str], naive_paths: list[str], scales, threads: int,
                       fixed: bool) -> dict:
    """R rounds of naive -> the --backend pipeline -> the ONNX Runtime pipeline -> the model-only limit of
    the engine the --backend pipeline ran on (and ONNX Runtime's), back to back; ratios within each round.

    On a shared machine the load can change several-fold between the steps of one table; a ratio
    whose two terms were measured seconds apart, repeated R times, and its median, is the figure
    to trust."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(os.path.abspath(p) for p in listing_paths) + "\n")
        listing = f.name
    batch = args.batch_size if fixed else None
    kw = dict(policy=args.policy, scales=scales, threads=args.threads)
    rounds = []
    try:
        for r in range(args.rounds):
            naive = isolated("naive_loop", naive_paths, args.layer, args.pool, args.policy, scales)
            pipe = isolated("pipeline", listing, args.backend, args.layer, args.pool, batch, args.workers,
                            precision=args.precision, **kw)
            engine = pipe["backend"]
            row = {"naive": naive, "backend": engine, "pipeline": pipe["images_per_s"]}
            if engine != "onnx":
                row["pipeline_onnx"] = isolated("pipeline", listing, "onnx", args.layer, args.pool, batch,
                                                args.workers, **kw)["images_per_s"]
            row["limit"] = _limit(engine, args, listing_paths, scales, threads, fixed)
            if engine != "onnx":
                row["limit_onnx"] = _limit("onnx", args, listing_paths, scales, threads, fixed)
            row.update(pipeline_vs_naive=row["pipeline"] / naive, pipeline_vs_limit=row["pipeline"] / row["limit"],
                       load_average=os.getloadavg()[0])
            line = (f"round {r + 1}: naive {naive:.2f}, pipeline ({args.backend}: {engine}) {row['pipeline']:.2f}, "
                    f"limit {row['limit']:.2f} img/s: {row['pipeline_vs_naive']:.2f}x the naive loop, "
                    f"{row['pipeline_vs_limit']:.0%} of the limit")
            if engine != "onnx":
                row.update(onnx_vs_naive=row["pipeline_onnx"] / naive,
                           pipeline_vs_onnx=row["pipeline"] / row["pipeline_onnx"],
                           limit_vs_onnx_limit=row["limit"] / row["limit_onnx"])
                line += (f"; onnx pipeline {row['pipeline_onnx']:.2f} ({row['onnx_vs_naive']:.2f}x naive, "
                         f"{engine} {row['pipeline_vs_onnx']:.2f}x it), onnx limit {row['limit_onnx']:.2f} "
                         f"({engine} limit {row['limit_vs_onnx_limit']:.2f}x it)")
            rounds.append(row)
            print(line + f" (load {row['load_average']:.1f})", flush=True)
    finally:
        os.unlink(listing)
    keys = [k for k in ("pipeline_vs_naive", "pipeline_vs_limit", "onnx_vs_naive", "pipeline_vs_onnx",
                        "limit_vs_onnx_limit") if all(k in r for r in rounds)]
    med = {k: float(np.median([r[k] for r in rounds])) for k in keys}
    print(f"median of {len(rounds)} rounds: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    return {"backend": args.backend, "precision": args.precision, "rounds": rounds, "median": med}


if __name__ == "__main__":
    sys.exit(main())
