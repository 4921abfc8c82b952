"""``deepfeat sync``: bring a store in line with the folders it was made from."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "sync", help="bring a store in line with its folders: new files added, changed ones re-extracted, "
                     "deleted ones removed",
        description="Scan the folders (files, globs, lists) the store was extracted from: files the store does "
                    "not know are added, known files whose size or modification time differ are hashed and, when "
                    "their bytes changed, extracted again under a new id, files that are gone are removed; the "
                    "store's index is refreshed. Same as `deepfeat extract FOLDER... -o STORE --sync` with the "
                    "store's own folders and settings. Interrupted (even by kill -9), run it again.")
    p.add_argument("store", metavar="STORE", help="feature store directory")
    p.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    p.add_argument("--json", action="store_true", help="print the report (with the paths of each change) as JSON")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decode processes (default: cores)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "openvino"],
                   help="inference backend for the files to extract (default auto, as extract)")
    p.add_argument("--no-cache", dest="graph_cache", action="store_false",
                   help="without the user cache folder: the ONNX/OpenVINO graph exported afresh, files whose "
                        "stat changed read again instead of taking their hash from the file-hash cache "
                        "(docs/startup.md, docs/commands.md)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"])
    p.set_defaults(func=run)


def run(args) -> int:
    from deepfeat.cli.cmd_extract import print_sync
    from deepfeat.collection.sync import preview_sync, sync_store
    from deepfeat.pipeline import ExtractConfig
    from deepfeat.pipeline.signals import Terminated, sigterm_interrupts
    from deepfeat.store import FeatureStore

    FeatureStore(args.store)  # not a store: its one-line error, before anything else
    verbose = getattr(args, "verbose", 0)
    if args.dry_run:
        plan = preview_sync(args.store, cache=args.graph_cache)
        if args.json:
            print(json.dumps(plan.to_dict(), indent=2))
            return 0
        print(f"would sync {args.store}: {plan.summary()}")
        for k in ("added", "changed", "deleted", "retried", "pending"):
            for path in getattr(plan, k) if verbose or plan.changes <= 20 else []:
                print(f"  {k}: {path}")
        return 0
    cfg = ExtractConfig(output=args.store, resume=True, workers=args.workers, batch_size=args.batch_size,
                        backend=args.backend, graph_cache=args.graph_cache, progress=args.progress,
                        given=frozenset())
    try:
        with sigterm_interrupts():
            rep = sync_store(cfg)
    except KeyboardInterrupt as e:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"\n{what}: run `deepfeat sync {args.store}` again to finish", file=sys.stderr)
        return code
    if args.json:
        print(json.dumps(rep.to_dict(paths=True), indent=2))
        return 0
    print_sync(rep, verbose=verbose)
    print(f"{rep.processed} images extracted in {rep.seconds:.1f}s: {rep.ok} ok, {rep.failed} failed")
    if rep.failures_report:
        print(f"failures: {rep.failures_report}")
    return 0
