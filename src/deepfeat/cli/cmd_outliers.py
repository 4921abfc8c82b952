"""``deepfeat outliers``: the images least like their neighbours (or closer to another class)."""

from __future__ import annotations

from deepfeat.cli.common import print_json


def register(sub) -> None:
    p = sub.add_parser("outliers", help="the images least like the rest of a store",
                       description="Score every image by 1 - its mean cosine similarity to its k nearest "
                                   "neighbours (FAISS) and list the highest; with --gt folders, list the images "
                                   "closer to another folder's centre than to their own.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--k", type=int, default=10, metavar="K", help="neighbours per image (default 10)")
    p.add_argument("--gt", choices=("folders",), help="folders: class = parent folder; flag images closer to another class")
    p.add_argument("--top", type=int, default=20, metavar="N", help="how many to list (default 20)")
    p.add_argument("--feature", metavar="LAYER", help="with a store of several layers: which one")
    p.add_argument("--json", action="store_true", help="every image's score as JSON")
    p.add_argument("--html", metavar="FILE", help="write a gallery page of the top ones")
    p.set_defaults(func=run)


def run(args) -> int:
    from deepfeat.collection.outliers import outlier_report
    from deepfeat.collection.pages import Group, Tile, write_gallery
    from deepfeat.store import FeatureStore

    store = FeatureStore(args.store)
    rep = outlier_report(store.vectors(args.feature), store.paths, k=args.k, gt=args.gt)
    top = rep["ranked"][:args.top]
    if args.html:
        tiles = [Tile(r["path"], f"{r['score']:.3f}" + (f" -> {r['nearest_class']}" if "nearest_class" in r else ""))
                 for r in top]
        write_gallery(args.html, "outliers", rep["how"], [Group(f"top {len(top)}", rep["how"], tiles)])
    if args.json:
        print_json(rep)
        return 0
    print(rep["how"])
    for i, r in enumerate(top, 1):
        extra = f"  closer to {r['nearest_class']} (margin {r['margin']:+.3f})" if "nearest_class" in r else ""
        print(f"{i:>4}  {r['score']:.4f}  {r['path']}{extra}")
    return 0
