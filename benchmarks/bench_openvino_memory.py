"""What holds memory in OpenVINO at large, varied input shapes: the engine alone, outside the pipeline.

Runs ``deepfeat.backends.openvino_runtime.CompiledGraphs`` (f32, dynamic) on real photos one at a time and
prints the resident memory every ``--every`` images and the time, with deepfeat's settings or others:
``--cache N`` (OpenVINO's ``CPU_RUNTIME_CACHE_CAPACITY``: kernels kept per input shape; OpenVINO's own
default is 5000; deepfeat's: 5000, 0 from ``long:768`` up), ``--max-shapes N`` (per-shape
compilations kept; 0: none) and ``--max-pixels P``
(input pixels over all of them).

    python benchmarks/bench_openvino_memory.py --n 400                              # deepfeat's settings
    python benchmarks/bench_openvino_memory.py --n 400 --cache 5000 --max-pixels 0  # OpenVINO's cache, 8 shapes
    python benchmarks/bench_openvino_memory.py --n 400 --cache 0 --max-shapes 0 --size long:512
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers17"))
    ap.add_argument("--cache", type=int, default=None, help="CPU_RUNTIME_CACHE_CAPACITY (default: deepfeat's)")
    ap.add_argument("--max-shapes", type=int, default=None, help="per-shape compilations kept (default: deepfeat's)")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="their input pixels in all (default: deepfeat's; 0: no limit but --max-shapes)")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--size", default="long:1024")
    ap.add_argument("--every", type=int, default=100)
    args = ap.parse_args()

    from deepfeat.backends import openvino_runtime as ovm
    from deepfeat.backends.featurenet import FeatureNet
    from deepfeat.data.images import decode_image, discover
    from deepfeat.data.preprocess import parse_size_policy
    from deepfeat.models import load_model
    from deepfeat.pooling import get_pooling

    model = load_model("efficientnet_lite0", device="cpu")
    fnet = FeatureNet(model, ["bn2"], get_pooling("gem")).eval()
    paths = discover([args.images])
    paths = paths[:: max(1, len(paths) // args.n)][: args.n]  # spread over the collection's classes
    policy = parse_size_policy(args.size)
    if args.cache is not None:
        ovm.runtime_cache_capacity = lambda pixels: args.cache
    kw = {} if args.max_shapes is None else {"max_shapes": args.max_shapes}
    if args.max_pixels is not None:
        kw["max_pixels"] = args.max_pixels or 1 << 62
    graphs = ovm.CompiledGraphs(fnet, "dynamic", threads=2, **kw)
    shapes, marks = set(), []
    t0 = time.perf_counter()
    for i, p in enumerate(paths, 1):
        x = decode_image(p, policy, model.data_config).pixels[None]
        shapes.add(x.shape)
        graphs.run(x)
        if i % args.every == 0:
            marks.append(f"{i}: {rss_mb():.0f} MB")
    cache = graphs.config.get("CPU_RUNTIME_CACHE_CAPACITY")
    print(f"cache {cache}, max shapes {graphs.max_shapes}, max pixels {graphs.max_pixels}, "
          f"{args.size}: {len(paths)} images, {len(shapes)} shapes, {graphs.shape_compiles} per-shape "
          f"compilations; RSS {', '.join(marks)}; peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} "
          f"MB; {time.perf_counter() - t0:.1f}s (decoding included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
