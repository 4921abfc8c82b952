"""``deepfeat duplicates``: groups of duplicate images in a store (or a folder, extracted
first), reviewed as text, JSON, CSV or a gallery, and removed safely."""

from __future__ import annotations

import csv
import os
import sys

from deepfeat.cli.common import print_json


def register(sub) -> None:
    p = sub.add_parser(
        "duplicates", help="find duplicate and near-duplicate images; review, move or delete them safely",
        description="Groups of duplicate images of a store: the same bytes, the same decoded pixels, or near copies "
                    "(crops, rotations, recompression, colour changes, mirrors) found by a k-NN search of the "
                    "store's descriptors and confirmed by geometric verification of local features. Nothing is "
                    "touched without --move-to or --delete; every action writes a manifest first, and --undo "
                    "MANIFEST puts the files back. With --query NEW..., new images are checked against the store "
                    "(and appended to it with --add or --add-unique). See docs/duplicates.md.")
    p.add_argument("store", metavar="STORE|FOLDER", nargs="?",
                   help="a feature store, or a folder of images to extract first into -o STORE")
    p.add_argument("-o", "--output", metavar="STORE", help="with a FOLDER: the store to extract it into")
    g = p.add_argument_group("finding")
    g.add_argument("--threshold", type=float, default=None, metavar="COS",
                   help="cosine of the global descriptors for a candidate pair (default 0.5 with verification, "
                        "0.9 without)")
    g.add_argument("--verify", action="store_true", default=True, help="confirm candidates geometrically (default)")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="take every candidate above --threshold (faster, mistakes same-class photos for copies)")
    g.add_argument("--extractor", default="sift", metavar="sift|cnn|orb[:ARGS]",
                   help="local features for verification (default sift; a cached section of the same spec is used)")
    g.add_argument("--min-inliers", type=int, default=16, metavar="N", help="inliers that confirm a pair (default 16)")
    g.add_argument("-k", "--neighbours", type=int, default=10, metavar="K",
                   help="neighbours searched per image (default 10)")
    g.add_argument("--no-exact", dest="exact", action="store_false",
                   help="skip the same-bytes and same-pixels passes")
    g.add_argument("--keep", default="pixels,bytes,oldest", metavar="CRITERIA",
                   help="keeper policy, criteria in order: pixels, bytes, oldest|newest, path "
                        "(default pixels,bytes,oldest)")
    g.add_argument("--index-kind", default="auto", metavar="KIND",
                   help="index built in memory when the store has no current saved index (default auto)")
    g.add_argument("--device", default="cpu", help="device for local features computed here (default cpu)")
    g.add_argument("--query", nargs="+", metavar="NEW",
                   help="check these new images against the store (is this already in my collection?) instead")
    g.add_argument("--no-cache", dest="graph_cache", action="store_false",
                   help="extract and embed in PyTorch, without the graph cache (exported graphs and prepared "
                        "networks, docs/startup.md)")
    g.add_argument("--add", action="store_true",
                   help="with --query: then append every queried image to the store (its own settings), "
                        "duplicates included")
    g.add_argument("--add-unique", action="store_true",
                   help="with --query: then append only the queried images that duplicate nothing in the store")
    o = p.add_argument_group("review")
    o.add_argument("--json", action="store_true", help="print the groups as JSON")
    o.add_argument("--csv", metavar="FILE", help="write one row per group member to FILE ('-' for stdout)")
    o.add_argument("--gallery", metavar="FILE.html|FILE.png", action="append", default=[],
                   help="write the groups as a self-contained HTML page or a PNG (repeatable)")
    a = p.add_argument_group("acting (nothing is touched without --move-to or --delete)")
    a.add_argument("--move-to", metavar="DIR", help="move every duplicate but the keeper under DIR (folders kept)")
    a.add_argument("--delete", action="store_true",
                   help="delete every duplicate but the keeper, for good: --undo cannot bring deleted files back, "
                        "so it needs --yes (see them first with --dry-run; --move-to DIR is the undoable way)")
    a.add_argument("--yes", action="store_true", help="confirm --delete")
    a.add_argument("--dry-run", action="store_true", help="print what --move-to/--delete would do; touch nothing")
    a.add_argument("--manifest", metavar="FILE",
                   help="where the manifest goes (default DIR/duplicates-TIME.manifest.json, or in the store)")
    a.add_argument("--undo", metavar="MANIFEST", help="put back the files a --move-to run moved")
    p.set_defaults(func=run)


def _settings(args):
    from deepfeat.collection.duplicates import DuplicateSettings

    return DuplicateSettings(threshold=args.threshold, verify=args.verify, extractor=args.extractor,
                             min_inliers=args.min_inliers, k=args.neighbours, keep=args.keep, exact=args.exact,
                             index_kind=args.index_kind)


def _open_store(args) -> str:
    """The store to read: STORE itself, or FOLDER extracted into -o STORE first."""
    from deepfeat.errors import UsageError

    if args.store is None:
        raise UsageError("give a STORE (or a FOLDER with -o STORE)")
    if os.path.isfile(os.path.join(args.store, "meta.json")):
        return args.store
    if not os.path.isdir(args.store):
        raise UsageError(f"{args.store} is neither a feature store nor a folder of images")
    if not args.output:
        raise UsageError(f"{args.store} is a folder, not a store: give -o STORE to extract it first")
    from deepfeat.pipeline import ExtractConfig, extract

    rep = extract(ExtractConfig(inputs=[args.store], output=args.output, resume=True, progress="none",
                                graph_cache=args.graph_cache))
    print(f"extracted {args.store} -> {args.output}: {rep.ok} ok, {rep.failed} failed", file=sys.stderr)
    return args.output


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def print_groups(rep) -> None:
    for gi, g in enumerate(rep.groups, 1):
        k = rep.files[g.keeper]
        print(f"group {gi} ({len(g.rows)} images): keep {k.path}  ({k.width}x{k.height}, {_size(k.bytes)})")
        for r in g.removable:
            f = rep.files[r]
            best = [x for x in g.pairs if r in (x.a, x.b)]
            x = min(best, key=lambda x: ("bytes", "pixels", "verified", "similar").index(x.kind))
            how = x.kind + (f"  cos {x.score:.3f}" if x.score is not None else "") + \
                (f"  {x.inliers} inliers" if x.inliers is not None else "")
            print(f"    duplicate {f.path}  ({f.width}x{f.height}, {_size(f.bytes)})  {how}")
    s = rep.stats
    print(f"{s['images']} images: {s['groups']} groups, {s['duplicates']} duplicates; {s['pairs']} pairs "
          f"from {s['candidates']} candidates (cosine >= {rep.settings.threshold:g}"
          f"{', verified' if rep.settings.verify else ''}) in {s['seconds']['total']:.1f}s")


def _print_outcome(o) -> None:
    print(f"{o.state:12s} {o.file}" + (f"  ({o.reason})" if o.reason and o.state != "moved" else "")
          + (f" -> {o.reason}" if o.state in ("moved", "would-move") else ""))


def _act(args, rep) -> int:
    from deepfeat.collection.actions import apply

    manifest, outcomes = apply(rep, move_to=args.move_to, delete=args.delete, dry_run=args.dry_run,
                               manifest=args.manifest, on_outcome=_print_outcome)
    states = {}
    for o in outcomes:
        states[o.state] = states.get(o.state, 0) + 1
    print(", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "nothing to do")
    if manifest is not None:
        print(f"manifest: {manifest} (undo: deepfeat duplicates --undo {manifest})")
    return 0


def _undo(args) -> int:
    from deepfeat.collection.actions import undo

    outcomes = undo(args.undo, on_outcome=_print_outcome)
    bad = [o for o in outcomes if o.state in ("lost", "not-restored", "deleted")]
    print(f"{sum(o.state == 'restored' for o in outcomes)} restored, "
          f"{sum(o.state == 'in-place' for o in outcomes)} already in place, {len(bad)} not restored"
          + (f" ({sum(o.state == 'deleted' for o in outcomes)} were deleted by --delete: deleted files cannot be "
             "restored; the manifest lists them with their sha256)" if any(o.state == "deleted" for o in bad) else ""))
    return 1 if bad else 0


def _query(args, store: str) -> int:
    from deepfeat.collection.query import add_queries, query_duplicates

    results = query_duplicates(store, args.query, _settings(args), device=args.device, graph_cache=args.graph_cache)
    if args.json:
        print_json([r.to_dict() for r in results])
    else:
        for r in results:
            if not r.matches:
                print(f"{r.query}: new (no duplicate in {store})")
            for m in r.matches:
                print(f"{r.query}: duplicate of {m.path}  {m.kind}  cos {m.score:.3f}"
                      + (f"  {m.inliers} inliers" if m.inliers is not None else ""))
    if args.add or args.add_unique:
        added = add_queries(store, results, unique_only=args.add_unique, graph_cache=args.graph_cache)
        out = sys.stderr if args.json else sys.stdout
        for image, why in added.skipped.items():
            print(f"not added {image}: {why}", file=out)
        print(f"added {len(added.added) - added.failed} image(s) to {store}"
              + (f"; {added.failed} could not be read (see {store}/failures.csv)" if added.failed else ""), file=out)
        return 1 if added.failed else 0
    return 0


def run(args) -> int:
    from deepfeat.collection.duplicates import find_duplicates
    from deepfeat.errors import UsageError

    if args.undo:
        return _undo(args)
    if args.move_to and args.delete:
        raise UsageError("give one of --move-to DIR and --delete, not both")
    if args.dry_run and not (args.move_to or args.delete):
        raise UsageError("--dry-run shows what --move-to DIR or --delete would do: give one of them")
    if args.delete and not (args.dry_run or args.yes):
        raise UsageError("--delete removes the duplicates for good (--undo cannot restore deleted files): add --yes "
                         "to confirm, --dry-run to see what it would delete, or use --move-to DIR, which --undo reverses")
    if (args.add or args.add_unique) and not args.query:
        raise UsageError("--add and --add-unique append the images of --query NEW... to the store: give --query")
    if args.add and args.add_unique:
        raise UsageError("give one of --add (every queried image) and --add-unique (those new to the store), not both")
    store = _open_store(args)
    if args.query:
        return _query(args, store)
    rep = find_duplicates(store, _settings(args), device=args.device)
    if args.csv:
        out = sys.stdout if args.csv == "-" else open(args.csv, "w", newline="")
        try:
            csv.writer(out).writerows(rep.csv_rows())
        finally:
            if out is not sys.stdout:
                out.close()
    for g in args.gallery:
        from deepfeat.collection.gallery import gallery_html, gallery_png

        (gallery_png if g.lower().endswith(".png") else gallery_html)(rep, g)
        print(f"gallery: {g}", file=sys.stderr)
    if args.json:
        print_json(rep.to_dict())
    elif args.csv != "-":
        print_groups(rep)
    if args.move_to or args.delete:
        return _act(args, rep)
    return 0
