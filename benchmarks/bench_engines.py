"""Which inference engine `--backend auto` should pick: `deepfeat extract` end to end with each
engine on the same images, side by side in one run.

Each engine's run is a fresh process (``bench_extract.isolated``: engines' idle thread pools slow
whatever runs after them in the same process); the engines are alternated ``--rounds`` times, the
order reversed every other round, and each round's ratio to the first engine is taken within the
round (the machine's load changes between rounds); the medians are printed. Rates are steady
state (after the first batch), as in bench_extract.py; ``--end-to-end`` prints those too, which
include the export and compilations.

    python benchmarks/bench_engines.py --policy long:512 --n 200
    python benchmarks/bench_engines.py --policy long:1024 --n 48 --engines onnx,openvino,openvino:bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import isolated


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers17"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--policy", default="long:512")
    ap.add_argument("--scales", default="1")
    ap.add_argument("--layer", default="bn2")
    ap.add_argument("--pool", default="gem")
    ap.add_argument("--engines", default="onnx,openvino",
                    help="BACKEND[:PRECISION],... (the first is the reference of the ratios; default onnx,openvino)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench-out/engines.json")
    args = ap.parse_args()

    from deepfeat.data.images import discover
    from deepfeat.specs import parse_scales

    paths = discover([args.images])[: args.n]
    scales = parse_scales(args.scales)
    engines = [tuple((e.split(":") + ["f32"])[:2]) for e in args.engines.split(",")]
    print(f"{len(paths)} images, size {args.policy}, scales {args.scales}, {args.layer} {args.pool}; load average "
          f"{os.getloadavg()[0]:.1f}", file=sys.stderr)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(os.path.abspath(p) for p in paths) + "\n")
        listing = f.name
    rounds = []
    try:
        for r in range(args.rounds):
            order = engines if r % 2 == 0 else engines[::-1]
            row = {}
            for backend, precision in order:
                res = isolated("pipeline", listing, backend, args.layer, args.pool, None, None, policy=args.policy,
                               scales=list(scales), precision=precision)
                row[f"{backend}:{precision}"] = res
            ref = row[":".join(engines[0])]["images_per_s"]
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {v['images_per_s']:.2f} img/s ({v['images_per_s'] / ref:.2f}x; end to end "
                f"{v['end_to_end_images_per_s']:.2f})" for k, v in row.items()) + f" (load {os.getloadavg()[0]:.1f})",
                flush=True)
            rounds.append(row)
    finally:
        os.unlink(listing)
    first = ":".join(engines[0])
    med = {}
    for backend, precision in engines:
        k = f"{backend}:{precision}"
        med[k] = {"vs_" + first: float(np.median([r[k]["images_per_s"] / r[first]["images_per_s"] for r in rounds])),
                  "images_per_s": float(np.median([r[k]["images_per_s"] for r in rounds])),
                  "end_to_end_vs_" + first: float(np.median([r[k]["end_to_end_images_per_s"]
                                                             / r[first]["end_to_end_images_per_s"] for r in rounds]))}
    for k, v in med.items():
        print(f"median {k}: {v['images_per_s']:.2f} img/s, {v['vs_' + first]:.2f}x {first} steady, "
              f"{v['end_to_end_vs_' + first]:.2f}x end to end")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rounds": rounds, "median": med}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
