"""``deepfeat local-features``: cache keypoints + descriptors in a store for ``--verify``, or regional
descriptors for ``--rerank regional-diffusion``."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("local-features", help="compute and cache local features (keypoints for spatial "
                                              "verification, regional descriptors for regional diffusion)",
                       description="Compute the local features of every image of a store once, so `search/eval "
                                   "--verify N` (keypoints) and `--rerank regional-diffusion` (regions) read them "
                                   "instead of recomputing database images. Resumable: run the same command again "
                                   "after an interruption. EXTRACTOR: cnn (dense keypoints from a layer of the "
                                   "store's model; cnn:layer=NAME,max=N,size=S,scales=1/0.707), sift[:max=N,size=S], "
                                   "orb[:max=N,size=S], or regions (the R-MAC grid of a layer, each region pooled "
                                   "and L2-normalised; regions:layer=NAME,L=3,pool=mac|gem,size=S,scales=1/0.707; "
                                   "default layer: the store's).")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--extractor", default="cnn", metavar="cnn|sift|orb|regions[:ARGS]")
    p.add_argument("--name", metavar="NAME", help="section name (default: the extractor's name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def print_report(rep: dict, store: str) -> None:
    what = "regions" if rep["spec"].startswith("regions") else "keypoints"
    print(f"local features {rep['name']} ({rep['spec']}): {rep['images']} images, {rep['keypoints']} {what} "
          f"in {rep['seconds']:.1f}s; {rep['shards_done']} shard(s) done, {rep['shards_skipped']} already done")
    for f in rep["failed"]:
        print(f"  ERROR {f}", file=sys.stderr)
    print(f"store: {store}")


def run(args) -> int:
    from deepfeat.localfeat.cache import build_local_features

    try:
        rep = build_local_features(args.store, args.extractor, name=args.name, device=args.device)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished shards are kept in {args.store}; run the same command again to continue",
              file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print_report(rep, args.store)
    return 0
