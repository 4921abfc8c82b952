"""``deepfeat export`` and ``deepfeat info``: get features out of a store; describe a store."""

from __future__ import annotations

from ..store import EXPORT_FORMATS, FeatureStore, export_store
from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("export", help="export a store's features (npz, h5, pkl, csv)",
                       description="Write the store's descriptors with their ids and paths. pkl writes the "
                                   "{image_path: feature} dict used by Compute-Features-style scripts.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--format", "-f", choices=EXPORT_FORMATS, help="default: from the output file's extension")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--feature", metavar="LAYER", help="which tapped layer (default: the first)")
    p.add_argument("--raw", action="store_true", help="pooled features without the post-processing chain")
    p.set_defaults(func=run_export)

    q = sub.add_parser("info", help="describe a feature store", description="Summary and meta of a feature store.")
    q.add_argument("store", metavar="STORE")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_info)


def run_export(args) -> int:
    from ..errors import UsageError

    fmt = args.format or args.output.rsplit(".", 1)[-1].lower()
    if fmt == "hdf5":
        fmt = "h5"
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"cannot tell the format from {args.output!r}; pass --format {'|'.join(EXPORT_FORMATS)}")
    store = FeatureStore(args.store)
    out = export_store(store, fmt, args.output, feature=args.feature, post=not args.raw)
    print(f"wrote {len(store)} x {store.post.output_dim(store.dim) if not args.raw else store.dim} "
          f"features to {out} ({fmt})")
    return 0


def run_info(args) -> int:
    store = FeatureStore(args.store)
    s = store.summary()
    if args.json:
        print_json({"summary": s, "meta": store.meta})
        return 0
    for k, v in s.items():
        print(f"{k:>9}: {v}")
    return 0
