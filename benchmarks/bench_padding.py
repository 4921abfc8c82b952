"""How far padded, masked batches move descriptors from the exact (unpadded) ones.

``deepfeat extract --pad-to M`` (torch, meant for GPUs) pads images to sides that are
multiples of M and pools with a mask (deepfeat.backends.padding). The pooling is exact; the network
is not (convolutions near the right and bottom border see the padding). This prints, for
every ``--step``-th image of a folder that needs padding, the cosine between the padded
descriptor (image alone in its bucket) and the exact one, per size policy and multiple.

    python benchmarks/bench_padding.py --images ../shared/data/flowers17 --step 45
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True)
    ap.add_argument("--step", type=int, default=45, help="every STEP-th image (Flowers 17: 31 images)")
    ap.add_argument("--policies", default="long:320,long:512")
    ap.add_argument("--multiples", default="32,64")
    ap.add_argument("--layer", default="bn2")
    ap.add_argument("--pool", default="gem")
    ap.add_argument("--out", default="bench-out/padding.json")
    args = ap.parse_args()
    import torch

    import deepfeat
    from deepfeat.backends.featurenet import FeatureNet, TorchRunner
    from deepfeat.backends.onnx_runtime import agreement
    from deepfeat.backends.padding import PaddedTorchRunner, bucket_shape
    from deepfeat.data.images import decode_image, discover
    from deepfeat.data.preprocess import parse_size_policy
    from deepfeat.pooling import get_pooling

    model = deepfeat.load_model("efficientnet_lite0")
    paths = discover([args.images])[:: args.step]
    fnet = FeatureNet(model, [args.layer], get_pooling(args.pool))
    ref = TorchRunner(fnet, torch.device("cpu"))
    rows = []
    for size in args.policies.split(","):
        ims = [decode_image(p, parse_size_policy(size), model.data_config).pixels for p in paths]
        exact = [ref(im[None])[0] for im in ims]
        for mult in (int(m) for m in args.multiples.split(",")):
            pad = PaddedTorchRunner(fnet, "cpu", mult)
            cos = [agreement(pad.run_list([im])[0], e)[0] for im, e in zip(ims, exact)
                   if bucket_shape(*im.shape[:2], mult) != im.shape[:2]]
            row = {"policy": size, "multiple": mult, "padded_images": len(cos), "min": float(np.min(cos)),
                   "median": float(np.median(cos))}
            rows.append(row)
            print(f"{size:10s} pad to x{mult:<3d} {len(cos):3d} padded images: cosine to exact min {row['min']:.4f}, "
                  f"median {row['median']:.4f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
