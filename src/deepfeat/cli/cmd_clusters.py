"""``deepfeat clusters``: group a store's images (k-means on FAISS, k given or chosen)."""

from __future__ import annotations

import sys

from deepfeat.cli.common import print_json


def register(sub) -> None:
    p = sub.add_parser("clusters", help="group a store's images into clusters",
                       description="Spherical k-means (FAISS) on a store's descriptors with --k, or an automatic "
                                   "number of clusters (--auto hdbscan, the default, or silhouette); prints each "
                                   "cluster's size and representatives (the members nearest its centre).")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--k", type=int, metavar="K", help="number of clusters (default: chosen by --auto)")
    p.add_argument("--auto", default="hdbscan", choices=("hdbscan", "silhouette"),
                   help="how k is chosen without --k (default hdbscan; docs/explore.md)")
    p.add_argument("--feature", metavar="LAYER", help="with a store of several layers: which one")
    p.add_argument("--representatives", type=int, default=5, metavar="N", help="per cluster (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object: clusters with members and representatives")
    p.add_argument("--csv", metavar="FILE", help="write path,cluster rows")
    p.add_argument("--export", metavar="DIR", help="write one folder of links per cluster")
    p.add_argument("--html", metavar="FILE", help="write a gallery page of the clusters")
    p.set_defaults(func=run)


def run(args) -> int:
    from deepfeat.collection.clusters import cluster
    from deepfeat.collection.exports import clusters_dict, clusters_gallery, export_links, write_csv
    from deepfeat.store import FeatureStore

    store = FeatureStore(args.store)
    X, paths = store.vectors(args.feature), store.paths
    c = cluster(X, args.k, auto=args.auto, seed=args.seed, n_representatives=args.representatives)
    if args.csv:
        write_csv(c, paths, args.csv)
    if args.export:
        print(f"{export_links(c, paths, args.export)} links in {c.k} folders under {args.export}", file=sys.stderr)
    if args.html:
        clusters_gallery(c, paths, args.html)
    doc = clusters_dict(c, paths)
    if args.json:
        print_json(doc)
        return 0
    print(f"{len(paths)} images -> {c.k} clusters ({c.how})")
    for entry in doc["clusters"]:
        print(f"cluster {entry['cluster']:>3}  {entry['size']:>5} images  e.g. {', '.join(entry['representatives'][:3])}")
    return 0
