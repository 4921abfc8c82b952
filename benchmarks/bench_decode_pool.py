"""What supervision costs: the decode stage on SupervisedPool against ProcessPoolExecutor.

deepfeat decodes in :class:`deepfeat.data.workers.SupervisedPool` (one message per image,
so that a hang or a crash costs one image) instead of the standard library's
``ProcessPoolExecutor`` (one message per batch, and one dead worker breaks the pool).
This decodes the same images in the same batches with both, alternated ``--repeat``
times in one run, and prints images/s and the ratio. Decoding only (no model), so the
difference is the pool's own overhead, not diluted by inference.

    python benchmarks/bench_decode_pool.py --images ../shared/data/flowers17 --limit 400
    python benchmarks/bench_decode_pool.py --images DIR --size warp:64x64 --batch-size 8

Writes JSON (default bench-out/decode_pool.json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from deepfeat.data.images import discover
from deepfeat.data.preprocess import DataConfig, parse_size_policy
from deepfeat.data.workers import SupervisedPool
from deepfeat.pipeline.decode import _worker_init, decode_batch


def run(pool, batches) -> float:
    t0 = time.perf_counter()
    n = 0
    for fut in [pool.submit(decode_batch, b) for b in batches]:
        n += len(fut.result()[0])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True)
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--size", default="model", help="size policy (default model: 224 x 224 after a 256 resize)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench-out/decode_pool.json")
    args = ap.parse_args()

    paths = discover([args.images])[: args.limit]
    items = list(enumerate(paths))
    batches = [items[i: i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    initargs = (parse_size_policy(args.size), DataConfig(), True, None, True)
    ctx = mp.get_context("spawn")
    pools = {
        "ProcessPoolExecutor": ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_worker_init,
                                                   initargs=initargs),
        "SupervisedPool": SupervisedPool(args.workers, _worker_init, initargs, timeout=120),
    }
    for pool in pools.values():  # start the workers and warm the page cache
        run(pool, batches[: 2 * args.workers])
    rates: dict[str, list[float]] = {k: [] for k in pools}
    for _ in range(args.repeat):
        for name, pool in pools.items():
            rates[name].append(run(pool, batches))
    for pool in pools.values():
        pool.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    res = {"images": len(paths), "size": args.size, "batch_size": args.batch_size, "workers": args.workers,
           "repeat": args.repeat, "images_per_s": rates, "median": med,
           "supervised_over_stdlib": med["SupervisedPool"] / med["ProcessPoolExecutor"]}
    for k, v in med.items():
        print(f"{k:20s} {v:7.1f} images/s (median of {args.repeat}: {', '.join(f'{x:.1f}' for x in rates[k])})")
    print(f"SupervisedPool / ProcessPoolExecutor: {res['supervised_over_stdlib']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
