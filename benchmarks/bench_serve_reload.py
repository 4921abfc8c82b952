"""What following the store costs a running ``deepfeat serve`` (:mod:`deepfeat.serve.reload`), in one run.

Writes a synthetic store (N x D clustered unit vectors, :func:`bench_remove.make_store`) with a
saved index of ``--kind``, opens it as the server does (:class:`~deepfeat.serve.view.StoreView`
under a :class:`~deepfeat.serve.reload.StoreWatcher` checking before every request), then times,
side by side:

* the check a request pays when nothing changed (``StoreWatcher.due``: a few ``stat`` calls),
  against one search of the view's index (k = 10) and against opening the view anew (what a
  server without the signature would pay to notice a change by reading the store);
* a reload after ``--remove`` items were removed by another writer (tombstones, the index
  updated in place): open the store and its index, swap; with the process's resident memory
  before, at the peak (both views alive while the new one opens) and after the old one is let go.

No model: the queries are stored vectors (the server keeps its model across reloads). With
``--store PATH`` a copy of a real store is used instead (its index of ``--kind`` built when it
has none).

    PYTHONPATH=src python benchmarks/bench_serve_reload.py --n 200000 --d 128 --kind flat
    PYTHONPATH=src python benchmarks/bench_serve_reload.py --store /tmp/flowers17-store --remove 14
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_remove import make_store


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def per_call(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--shard", type=int, default=20_000)
    ap.add_argument("--kind", default="flat", choices=["flat", "ivf", "hnsw"])
    ap.add_argument("--remove", type=int, default=1000, help="items removed before the reload")
    ap.add_argument("--checks", type=int, default=20_000, help="unchanged checks timed")
    ap.add_argument("--store", metavar="PATH", help="a real store, copied (instead of a synthetic one)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()

    from deepfeat.index.update import refresh_index
    from deepfeat.search import build_index
    from deepfeat.serve.reload import StoreWatcher
    from deepfeat.serve.view import StoreView, store_signature
    from deepfeat.store import FeatureStore
    from deepfeat.store.removal import remove_items

    tmp = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    try:
        path = tmp / "store"
        t = time.perf_counter()
        if args.store:
            shutil.copytree(args.store, path)
            store = FeatureStore(path)
            args.n, args.d = len(store), store.dim
        else:
            store = make_store(path, args.n, args.d, args.shard)
        if not (path / "index" / "index.json").is_file() or not args.store:
            build_index(store, kind=args.kind, **({"nlist": 256, "nprobe": 16} if args.kind == "ivf" else {}))
        args.kind = json.loads((path / "index" / "index.json").read_text())["kind"]
        made = time.perf_counter() - t
        gc.collect()
        base = rss_mib()

        def prepare(view, before):
            _ = view.engine.active_index

        watcher = StoreWatcher(path, lambda g: StoreView(path, g), prepare, check_s=0)
        view = watcher.view
        prepare(view, None)
        opened = rss_mib()
        xq = np.ascontiguousarray(view.engine.xb[:200])
        check_s = per_call(watcher.due, args.checks)
        stat_s = per_call(lambda: store_signature(path), args.checks)
        it = iter(range(10**9))
        search_s = per_call(lambda: view.engine.search(xq[next(it) % len(xq)][None], k=10), 200)
        t = time.perf_counter()
        again = StoreView(path, 2)
        _ = again.engine.active_index
        open_s = time.perf_counter() - t
        del again
        gc.collect()

        rows = np.linspace(0, args.n - 1, args.remove).astype(int)
        t = time.perf_counter()
        remove_items(FeatureStore(path), [int(i) for i in view.engine.ids[rows]], "bench")
        refresh = refresh_index(FeatureStore(path))
        writer_s = time.perf_counter() - t
        assert watcher.due()
        before_reload = rss_mib()
        t = time.perf_counter()
        assert watcher.reload()
        reload_s = time.perf_counter() - t
        peak_both = rss_mib()  # the old view is still referenced here (as by a request in flight)
        view = None  # the old view let go (as when the last request holding it ends)
        gc.collect()
        after = rss_mib()
        assert watcher.view.count == args.n - args.remove and watcher.view.engine.index is not None

        out = {
            "n": args.n, "d": args.d, "kind": args.kind, "removed": args.remove, "store_made_s": round(made, 2),
            "check_unchanged_us": round(check_s * 1e6, 2), "store_signature_us": round(stat_s * 1e6, 2),
            "search_k10_ms": round(search_s * 1e3, 3), "open_view_s": round(open_s, 3),
            "writer_remove_and_refresh_s": round(writer_s, 3), "reload_s": round(reload_s, 3),
            "refresh": refresh,
            "rss_mib": {"before_open": round(base, 1), "one_view": round(opened, 1),
                        "before_reload": round(before_reload, 1), "both_views": round(peak_both, 1),
                        "after_old_released": round(after, 1)},
            "ratios": {"check_over_search": round(check_s / search_s, 5),
                       "check_over_open": round(check_s / open_s, 7),
                       "reload_over_open": round(reload_s / open_s, 3)},
        }
        print(f"{args.n} x {args.d} {args.kind}: check (nothing changed) {check_s * 1e6:.1f} us "
              f"({stat_s * 1e6:.1f} us of stat calls); one search {search_s * 1e3:.2f} ms; opening the store "
              f"{open_s:.2f} s")
        print(f"  check / search = {check_s / search_s:.5f}; check / open = {check_s / open_s:.7f}")
        print(f"  writer: removed {args.remove} and {refresh} in {writer_s:.2f} s; reload {reload_s:.2f} s "
              f"(= {reload_s / open_s:.2f} x opening)")
        print(f"  RSS MiB: {base:.0f} before, {opened:.0f} one view, {peak_both:.0f} both views, "
              f"{after:.0f} after the old one is released")
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
