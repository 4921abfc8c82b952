"""``deepfeat export`` and ``deepfeat info``: get features out of a store; describe a store."""

from __future__ import annotations

from deepfeat.cli.common import print_json
from deepfeat.store import EXPORT_FORMATS, FeatureStore, export_store


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

    q = sub.add_parser("info", help="describe a feature store (--verify: check every file)",
                       description="Summary and meta of a feature store. With --verify, hash every file (shards, "
                                   "items tables, fitted post-processing, pooling codebook, index) against the "
                                   "checksums recorded when it was written, and check the shards' shapes; exit "
                                   "status 1 if anything is wrong.")
    q.add_argument("store", metavar="STORE")
    q.add_argument("--json", action="store_true")
    q.add_argument("--verify", action="store_true", help="check every file's sha256 and the shards' shapes")
    q.set_defaults(func=run_info)


def run_export(args) -> int:
    from deepfeat.errors import UsageError

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
    store = FeatureStore(args.store, check_meta_digest=not args.verify)  # --verify reports an edited meta
    if args.verify:
        return _run_verify(store, args.json)
    s = store.summary()
    if args.json:
        print_json({"summary": s, "meta": store.meta})
        return 0
    for k, v in s.items():
        print(f"{k:>9}: {v}")
    return 0


def _run_verify(store: FeatureStore, as_json: bool) -> int:
    import time

    t0 = time.perf_counter()
    report = store.verify()
    seconds = time.perf_counter() - t0
    if as_json:
        print_json({**report.to_dict(), "seconds": round(seconds, 3)})
        return 0 if report.ok else 1
    for c in report.checks:
        if c.status != "ok":
            print(f"{c.status.upper():>9}  {c.file}: {c.detail}")
    n = report.counts()
    print(f"{store.path}: {n['ok']} files ok, {n['bad']} bad, {n['unchecked']} unchecked ({seconds:.2f} s)")
    return 0 if report.ok else 1
