"""Inference threads against decode workers, end to end, side by side in one run.

Runs ``deepfeat extract`` (backend auto: ONNX Runtime) on the same images with each
``--threads T --workers W`` combination, alternated ``--repeat`` times (order reversed
every other round, so a change in the machine's load hits them alike), and prints images/s
after the first batch with the ratio to deepfeat's default for this core count
(:func:`deepfeat.backends.onnx_runtime.default_threads`).

    python benchmarks/bench_threads.py --images ../shared/data/flowers17 --policy long:512 --n 160
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True)
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--policy", default="long:512")
    ap.add_argument("--combos", default=None,
                    help="T:W,... (default for 2 cores: 2:2,2:1,1:2,1:1; else the default and halves)")
    ap.add_argument("--scales", default=None, help="e.g. 1,0.707,0.5 (default: one scale)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="bench-out/threads.json")
    args = ap.parse_args()

    from deepfeat.backends.onnx_runtime import default_threads, work_pixels
    from deepfeat.pipeline import ExtractConfig, extract

    cores = os.cpu_count() or 1
    scales = tuple(float(v) for v in args.scales.split(",")) if args.scales else (1.0,)
    dt, dw = default_threads(pixels=work_pixels(args.policy, scales))
    if args.combos:
        combos = [tuple(int(v) for v in c.split(":")) for c in args.combos.split(",")]
    else:
        combos = [(dt, dw), (dt, max(1, dw // 2)), (max(1, dt // 2), dw), (max(1, dt // 2), max(1, dw // 2))]
    combos = list(dict.fromkeys(combos))
    print(f"{cores} cores; default threads {dt}, workers {dw}; combos {combos}", file=sys.stderr)
    scales_kw = {"scales": tuple(float(v) for v in args.scales.split(","))} if args.scales else {}
    rates: dict[str, list[float]] = {f"{t}:{w}": [] for t, w in combos}
    tmp = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    try:
        for r in range(args.repeat):
            for t, w in (combos if r % 2 == 0 else combos[::-1]):
                out = tmp / f"s{t}_{w}"
                rep = extract(ExtractConfig(inputs=[args.images], output=str(out), size=args.policy, threads=t,
                                            workers=w, **scales_kw, limit=args.n, progress="none"))
                rates[f"{t}:{w}"].append(rep.steady_images_per_s)
                print(f"  round {r}: --threads {t} --workers {w}: {rep.steady_images_per_s:.2f} img/s "
                      f"({rep.backend})", file=sys.stderr, flush=True)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = f"{dt}:{dw}"
    print(f"\n{'--threads:--workers':20s} {'img/s by round':>30s} {'mean':>7s} {'vs default':>10s}")
    for k, v in rates.items():
        m = sum(v) / len(v)
        mb = sum(rates[base]) / len(rates[base])
        print(f"{k:20s} {', '.join(f'{x:.2f}' for x in v):>30s} {m:7.2f} {m / mb:9.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cores": cores, "policy": args.policy, "scales": args.scales, "n": args.n, "rates": rates,
                                          "default": base}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
