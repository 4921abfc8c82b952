"""ONNX Runtime at retrieval sizes: which graphs for many input shapes? Side by side, one run.

Aspect-preserving policies (``long:512``) give a collection hundreds of distinct input
shapes. Three ways to run them in ONNX Runtime, on the same real images, pre-decoded
(model only, so decoding does not blur the comparison), same threads:

  (a) dynamic  - one graph with dynamic batch, height and width (deepfeat's choice);
  (b) static   - one graph per exact shape (H and W fixed), at most 16 kept (LRU), as
                 deepfeat used for one-shape policies;
  (c) buckets  - sides rounded up to a multiple (default 64), one static graph per bucket,
                 images padded (normalised zeros) and pooled with a mask
                 (deepfeat.backends.padding.masked_pool): fewer graphs, fuller batches, but the
                 descriptors change near the borders; their cosine to the exact ones is
                 reported.

Each is timed twice over all the images: pass 1 from cold (every export included) and
pass 2 warm (only the LRU's re-exports). Prints images/s, exports and ratios to (a).

    python benchmarks/bench_onnx_shapes.py --images ../shared/data/flowers17 --n 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--policy", default="long:512")
    ap.add_argument("--layer", default="bn2")
    ap.add_argument("--pool", default="gem")
    ap.add_argument("--multiple", type=int, default=64, help="bucket multiple for (c)")
    ap.add_argument("--max-static", type=int, default=16, help="LRU size for (b)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench-out/onnx_shapes.json")
    args = ap.parse_args()

    import torch

    import deepfeat
    from deepfeat.backends.featurenet import FeatureNet
    from deepfeat.backends.onnx_runtime import GraphCache, agreement, default_threads
    from deepfeat.backends.padding import bucket_shape, masked_pool, valid_map_size, valid_mask
    from deepfeat.data.images import decode_image, discover
    from deepfeat.data.preprocess import parse_size_policy
    from deepfeat.pipeline import CPU_BATCH_PIXELS, shard_batches
    from deepfeat.pooling import get_pooling

    threads = args.threads or default_threads()[0]
    torch.set_num_threads(threads)
    model = deepfeat.load_model("efficientnet_lite0")
    pooling = get_pooling(args.pool)
    policy = parse_size_policy(args.policy)
    paths = discover([args.images])[: args.n]
    pixels = [decode_image(p, policy, model.data_config).pixels for p in paths]
    shapes = [px.shape[:2] for px in pixels]
    items = [(i, "") for i in range(len(pixels))]
    exact_batches, _ = shard_batches(items, policy, 8, shapes, CPU_BATCH_PIXELS)
    bucket_batches, _ = shard_batches(items, policy, 8, shapes, CPU_BATCH_PIXELS, pad_to=args.multiple)
    print(f"{len(pixels)} images at {args.policy}: {len(set(shapes))} shapes, "
          f"{len({bucket_shape(*s, args.multiple) for s in shapes})} buckets of {args.multiple}; {threads} threads",
          file=sys.stderr)

    fnet = FeatureNet(model, [args.layer], pooling).eval()
    maps_net = FeatureNet(model, [args.layer], torch.nn.Identity()).eval()
    cfg = model.data_config
    fill = np.array([round(m / cfg.scale) for m in cfg.mean[:3]], np.uint8)  # normalises to ~0

    def run_exact(cache):
        out = {}
        for b in exact_batches:
            res = cache.run(np.stack([pixels[i] for i, _ in b]))[0]
            out.update({i: res[k] for k, (i, _) in enumerate(b)})
        return out

    def run_buckets(cache):
        out = {}
        for b in bucket_batches:
            idx = [i for i, _ in b]
            bh, bw = bucket_shape(*np.max([shapes[i] for i in idx], axis=0), args.multiple)
            batch = np.empty((len(idx), bh, bw, 3), np.uint8)
            batch[:] = fill
            for k, i in enumerate(idx):
                h, w = shapes[i]
                batch[k, :h, :w] = pixels[i]
            maps = torch.from_numpy(cache.run(batch)[0])
            valid = [valid_map_size(shapes[i], (bh, bw), tuple(maps.shape[2:])) for i in idx]
            pooled = masked_pool(maps, valid_mask(valid, tuple(maps.shape[2:])), pooling).numpy()
            out.update({i: pooled[k] for k, i in enumerate(idx)})
        return out

    caches = {"dynamic": GraphCache(fnet, "dynamic", threads),
              "static": GraphCache(fnet, "static", threads, max_static=args.max_static),
              "buckets": GraphCache(maps_net, "static", threads, max_static=1000)}
    runs = {"dynamic": run_exact, "static": run_exact, "buckets": run_buckets}
    res: dict = {k: {} for k in caches}
    outs = {}
    for p in (1, 2):
        for name, cache in caches.items():
            e0, x0 = cache.export_seconds, cache.exports
            t0 = time.perf_counter()
            outs[name] = runs[name](cache)
            dt = time.perf_counter() - t0
            res[name][f"pass{p}"] = {"images_per_s": len(pixels) / dt, "seconds": dt,
                                     "exports": cache.exports - x0, "export_seconds": cache.export_seconds - e0}
            print(f"  pass {p} {name:8s} {len(pixels) / dt:7.2f} img/s, {cache.exports - x0} exports "
                  f"({cache.export_seconds - e0:.1f}s)", file=sys.stderr, flush=True)
    ref = np.stack([outs["dynamic"][i] for i in range(len(pixels))])
    for name in caches:
        got = np.stack([outs[name][i] for i in range(len(pixels))])
        cos = [agreement(got[i: i + 1], ref[i: i + 1])[0] for i in range(len(pixels))]
        res[name]["cosine_to_exact"] = {"min": float(np.min(cos)), "median": float(np.median(cos))}
        res[name]["graphs_kept"] = caches[name].graphs
    base1, base2 = res["dynamic"]["pass1"]["images_per_s"], res["dynamic"]["pass2"]["images_per_s"]
    print(f"\n{'graphs':10s} {'cold img/s':>11s} {'vs (a)':>7s} {'warm img/s':>11s} {'vs (a)':>7s} {'exports':>8s} "
          f"{'cos min':>8s} {'cos median':>10s}")
    for name in caches:
        r = res[name]
        print(f"{name:10s} {r['pass1']['images_per_s']:11.2f} {r['pass1']['images_per_s'] / base1:6.2f}x "
              f"{r['pass2']['images_per_s']:11.2f} {r['pass2']['images_per_s'] / base2:6.2f}x "
              f"{r['pass1']['exports'] + r['pass2']['exports']:8d} {r['cosine_to_exact']['min']:8.4f} "
              f"{r['cosine_to_exact']['median']:10.4f}")
    res["setup"] = {"n": len(pixels), "shapes": len(set(shapes)), "policy": args.policy, "threads": threads,
                    "multiple": args.multiple, "max_static": args.max_static, "cpus": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
