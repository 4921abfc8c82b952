"""Removal (issue 30): the saved index brought up to date in place against rebuilt, in one run.

Writes a synthetic store (N x D clustered unit vectors in shards of ``--shard`` rows, through
the store's own writer), builds its index of each ``--kinds`` kind, removes ``--remove`` of the
items (spread over the shards) and appends ``--append`` rows as a new shard; then times
:func:`deepfeat.index.update.refresh_index` (in place) against building the same kind anew over
the rows now, checks that both return the same neighbours for 200 queries, and times the
removal itself and a compaction. Prints ratios; writes JSON with ``--json``.

    python benchmarks/bench_remove.py --n 200000 --d 128 --kinds flat,ivf,ondisk
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_store(path: Path, n: int, d: int, shard: int, seed: int = 0, start_id: int = 0, first_shard: int = 0):
    from deepfeat.store import FeatureStore, ShardItems

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(256, d)).astype(np.float32)
    meta = {"model": {"spec": "synthetic"}, "layers": ["f"], "pooling": "none", "post": "none",
            "features": {"f": {"dim": d}}, "size": "none"}
    store = FeatureStore.create(path, meta)
    for k, lo in enumerate(range(0, n, shard)):
        m = min(shard, n - lo)
        x = centres[rng.integers(0, 256, m)] + 0.4 * rng.standard_normal((m, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        items = ShardItems.empty()
        for j in range(m):
            items.add(start_id + lo + j, f"img/{start_id + lo + j:08d}.jpg", ok=True, offset=j)
        store.commit_shard(first_shard + k, items, {"f": x})
    store.consolidate()
    return FeatureStore(path)


def build(store, kind: str, nlist: int):
    from deepfeat.index.ondisk import StoreSource, build_ondisk
    from deepfeat.index.update import INDEX_DIR, index_source_meta, save_rows
    from deepfeat.search import build_index

    if kind == "ondisk":
        index = build_ondisk(StoreSource(store.path), store.path / INDEX_DIR, kind="ivf", nlist=nlist,
                             nprobe=nlist // 4, source_meta=index_source_meta(store, "f"))
        meta = index.meta
        save_rows(store.path / INDEX_DIR, store.ids, meta)  # as deepfeat remove leaves it after a first refresh
        from deepfeat.index.persist import write_index

        write_index(index.faiss_index, meta, store.path / INDEX_DIR)
        return
    build_index(store, kind=kind, **({"nlist": nlist, "nprobe": nlist // 4} if kind == "ivf" else {}))


def run(args) -> dict:
    from deepfeat.index.update import refresh_index
    from deepfeat.search.store_index import open_saved_index
    from deepfeat.store import FeatureStore
    from deepfeat.store.compaction import compact_store
    from deepfeat.store.removal import remove_items

    out = {"n": args.n, "d": args.d, "removed": int(args.n * args.remove), "appended": args.append, "kinds": {}}
    for kind in args.kinds.split(","):
        tmp = Path(tempfile.mkdtemp(prefix="bench-remove-"))
        try:
            store = make_store(tmp / "s", args.n, args.d, args.shard)
            build(store, kind, args.nlist)
            rng = np.random.default_rng(1)
            gone = np.sort(rng.choice(store.ids, int(args.n * args.remove), replace=False))
            t0 = time.perf_counter()
            remove_items(store, gone.tolist(), "bench")
            t_remove = time.perf_counter() - t0
            nshards = len(store.committed_shards())
            extra = make_store(tmp / "a", args.append, args.d, args.append, seed=7, start_id=args.n + 10,
                               first_shard=nshards + 5)
            s = FeatureStore(tmp / "s")
            for shard in extra.committed_shards():  # appended: the same files committed into the store
                t = extra.shard_items(shard)
                from deepfeat.store import ShardItems

                items = ShardItems.empty()
                for i, p, o in zip(t.column("id").to_pylist(), t.column("path").to_pylist(),
                                   t.column("offset").to_pylist()):
                    items.add(i, p, ok=True, offset=o)
                s.commit_shard(shard, items, {"f": np.load(extra.shard_feature_path(shard, "f"))})
            s.consolidate()
            t0 = time.perf_counter()
            account = refresh_index(FeatureStore(tmp / "s"))
            t_refresh = time.perf_counter() - t0
            s = FeatureStore(tmp / "s")
            xq = np.ascontiguousarray(s.vectors()[:: max(1, len(s) // 200)][:200])
            _, I_place = open_saved_index(s, "f").search(xq, 10)
            shutil.rmtree(tmp / "s" / "index")
            t0 = time.perf_counter()
            build(s, kind, args.nlist)
            t_rebuild = time.perf_counter() - t0
            _, I_new = open_saved_index(FeatureStore(tmp / "s"), "f").search(xq, 10)
            t0 = time.perf_counter()
            report = compact_store(FeatureStore(tmp / "s"))
            t_compact = time.perf_counter() - t0
            agree = float(np.mean(I_place == I_new))
            out["kinds"][kind] = {"refresh_s": round(t_refresh, 3), "rebuild_s": round(t_rebuild, 3),
                                  "rebuild_over_refresh": round(t_rebuild / t_refresh, 2), "account": account,
                                  "same_neighbours": round(agree, 4), "remove_s": round(t_remove, 3),
                                  "compact_s": round(t_compact, 3), "compacted_shards": len(report["shards"])}
            print(f"{kind:>7}: refresh {t_refresh:.2f}s ({account}); rebuild {t_rebuild:.2f}s = "
                  f"{t_rebuild / t_refresh:.1f}x; same top-10 {agree:.3f}; remove_items {t_remove:.2f}s; "
                  f"compact {t_compact:.2f}s ({len(report['shards'])} shards)", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--shard", type=int, default=10_000)
    ap.add_argument("--remove", type=float, default=0.01, help="fraction of the items removed")
    ap.add_argument("--append", type=int, default=2_000, help="rows appended as a new shard")
    ap.add_argument("--nlist", type=int, default=256)
    ap.add_argument("--kinds", default="flat,ivf,ondisk")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    out = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
