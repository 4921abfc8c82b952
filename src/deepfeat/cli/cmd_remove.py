"""``deepfeat remove``: take items out of a store (by path, by id, or every file gone from disk),
bring its saved index up to date, and reclaim the space with ``--compact``."""

from __future__ import annotations

from deepfeat.cli.common import print_json
from deepfeat.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("remove", help="remove images from a store (by path, id, or --missing); --compact reclaims space",
                       description="Mark items of a store as removed: every reader (search, export, info, serve) "
                                   "leaves them out, the saved index is updated in place where its kind allows "
                                   "(flat, ivf, ivfpq, on-disk ivf) and rebuilt otherwise (hnsw), and the same "
                                   "file extracted again becomes a new item. Committed shards are not rewritten "
                                   "until --compact, which rewrites only the shards holding removed rows; both "
                                   "are safe against a crash at any point. Takes the store's writer lock.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("paths", nargs="*", metavar="PATH", help="stored image paths (as stored, or normalised)")
    p.add_argument("--missing", action="store_true", help="remove every item whose file no longer exists")
    p.add_argument("--ids", metavar="ID,ID,...", help="item ids (the id column of `deepfeat export`), comma-separated")
    p.add_argument("--reason", default=None, help="recorded with each removal (default: how it was chosen)")
    p.add_argument("--compact", action="store_true",
                   help="then rewrite the shards that hold removed rows and delete the old files")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed; change nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_remove)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--ids {text!r}: give item ids as whole numbers separated by commas, e.g. 3,5,9") from None


def _chosen(store, args) -> tuple[list[int], list[str], str]:
    from deepfeat.store.removal import ids_of_paths, missing_items

    ids: list[int] = []
    reasons = []
    if args.paths:
        ids += ids_of_paths(store, args.paths)
        reasons.append("path")
    if args.ids:
        ids += _parse_ids(args.ids)
        reasons.append("id")
    if args.missing:
        ids += missing_items(store)["ids"]
        reasons.append("missing")
    if not (args.paths or args.ids or args.missing or args.compact):
        raise UsageError("nothing to remove: give PATH..., --missing or --ids (or --compact to reclaim space)")
    every = store.committed_items()
    path_of = dict(zip(every.column("id").to_pylist(), every.column("path").to_pylist()))
    ids = sorted(set(ids))
    return ids, [path_of.get(i, "?") for i in ids], args.reason or "+".join(reasons) or "compact"


def run_remove(args) -> int:
    from deepfeat.index.update import refresh_index
    from deepfeat.localfeat.cache import carry_over_sections
    from deepfeat.pipeline import faults
    from deepfeat.store import FeatureStore
    from deepfeat.store.compaction import compact_store, finish_compaction
    from deepfeat.store.lock import StoreLock
    from deepfeat.store.removal import remove_items

    store = FeatureStore(args.store)
    with StoreLock(store.path, create=False):
        store = FeatureStore(store.path)  # as it is now, under the lock
        if (store.path / "compact.json").is_file():
            finish_compaction(store)  # a compaction was stopped: finish it first
            store = FeatureStore(store.path)
        ids, paths, reason = _chosen(store, args)
        out = {"store": str(store.path), "dry_run": args.dry_run, "removed": [], "already_removed": 0}
        if args.dry_run:
            out["would_remove"] = [{"id": i, "path": p} for i, p in zip(ids, paths)]
            return _report(out, args.json)
        n = remove_items(store, ids, reason, on_step=faults.step_fault) if ids else 0
        out["removed"] = [{"id": i, "path": p} for i, p in zip(ids, paths)]
        out["newly_removed"], out["already_removed"] = n, len(ids) - n
        if args.compact:
            out["compaction"] = compact_store(store, on_step=faults.step_fault)
        store = FeatureStore(store.path)
        out["index"] = refresh_index(store)
        out["local_features"] = carry_over_sections(store)
        out["dba"] = "saved DBA vectors are recomputed when next used (the store's fingerprint changed)" if (
            n or args.compact) else "unchanged"
        out["items"] = len(store)
    return _report(out, args.json)


def _report(out: dict, as_json: bool) -> int:
    if as_json:
        print_json(out)
        return 0
    if out["dry_run"]:
        for r in out["would_remove"]:
            print(f"would remove {r['id']}: {r['path']}")
        print(f"{len(out['would_remove'])} item(s) would be removed (dry run: nothing changed)")
        return 0
    for r in out["removed"]:
        print(f"removed {r['id']}: {r['path']}")
    print(f"{out['newly_removed']} item(s) removed ({out['already_removed']} already were); "
          f"{out['items']} left in {out['store']}")
    if "compaction" in out:
        c = out["compaction"]
        moved = ", ".join(f"{a}->{b if b is not None else 'gone'}" for a, b in c["shards"].items()) or "none"
        print(f"compacted: shards {moved}; {c['rows_reclaimed']} row(s), {c['bytes_reclaimed']} bytes reclaimed")
    print(f"index: {out['index']}")
    for line in out["local_features"]:
        print(f"local features: {line}")
    print(f"DBA: {out['dba']}")
    return 0
