"""``deepfeat map``: a 2-D map of a store as one self-contained interactive page and a PNG."""

from __future__ import annotations

import sys


def register(sub) -> None:
    from deepfeat.collection.layout import MAX_POINTS, METHODS, PLACE_K
    from deepfeat.collection.maps import COLOUR_BY, MAX_THUMBS

    p = sub.add_parser("map", help="a 2-D map of a store's images (HTML page and PNG)",
                       description="Lay out a store's descriptors in 2-D (PCA, t-SNE, or UMAP where umap-learn is "
                                   "installed) and write one self-contained page: zoom, pan, thumbnails embedded, "
                                   "coloured by folder, your classifier's label, cluster or outlier score. Large "
                                   "stores: a random subsample is laid out, the rest placed at the mean position of "
                                   "their nearest laid-out neighbours (FAISS).")
    p.add_argument("store", metavar="STORE")
    p.add_argument("-o", "--output", required=True, metavar="FILE.html", help="the page to write")
    p.add_argument("--png", metavar="FILE.png", help="also a PNG picture (matplotlib), coloured by the first --colour-by")
    p.add_argument("--method", default="auto", choices=METHODS,
                   help="layout: auto (umap if installed, else tsne; default), pca, tsne, umap")
    p.add_argument("--colour-by", "--color-by", dest="colour_by", default="folder", metavar="LIST",
                   help=f"comma-separated colourings, the first shown first: {', '.join(COLOUR_BY)} (default folder)")
    p.add_argument("--classifier", metavar="CLF", help="for --colour-by label: a folder made by fit-classifier")
    p.add_argument("--k", type=int, metavar="K", help="for --colour-by cluster: k (default: automatic, as `clusters`)")
    p.add_argument("--max-points", type=int, default=MAX_POINTS, metavar="N",
                   help=f"laid out by the method; the rest placed by neighbours (default {MAX_POINTS})")
    p.add_argument("--neighbours", type=int, default=PLACE_K, metavar="K",
                   help=f"laid-out neighbours averaged to place the others (default {PLACE_K})")
    p.add_argument("--thumbnails", type=int, default=MAX_THUMBS, metavar="N",
                   help=f"thumbnails embedded in the page (default {MAX_THUMBS}; the rest are dots)")
    p.add_argument("--feature", metavar="LAYER", help="with a store of several layers: which one")
    p.add_argument("--title", default=None, help="page title (default: the store's folder name)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from deepfeat.collection.maps import build_map, write_map_html, write_map_png
    from deepfeat.store import FeatureStore

    store = FeatureStore(args.store)
    colour_by = [c.strip() for c in args.colour_by.split(",") if c.strip()]
    title = args.title or f"map of {os.path.basename(os.path.normpath(args.store))}"
    m = build_map(store.vectors(args.feature), store.paths, method=args.method, colour_by=colour_by,
                  classifier=args.classifier, k=args.k, max_points=args.max_points, place_k=args.neighbours,
                  seed=args.seed, title=title)
    n_thumbs = write_map_html(args.output, m, max_thumbs=args.thumbnails, seed=args.seed)
    print(f"{len(m.paths)} images: {m.layout.how}", file=sys.stderr)
    print(f"wrote {args.output} ({n_thumbs} thumbnails; coloured by {', '.join(m.colourings)})")
    if args.png:
        write_map_png(args.png, m)
        print(f"wrote {args.png}")
    return 0
