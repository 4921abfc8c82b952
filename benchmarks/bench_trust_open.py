"""What each integrity check costs when a large store is opened and first read (issue 26).

    python benchmarks/bench_trust_open.py                       # 1,000,000 x 128 float32, shards of 1024
    python benchmarks/bench_trust_open.py --rows 200000 --out bench-out/trust_open.json

Builds a synthetic store (random float32 rows through :meth:`FeatureStore.commit_shard`, so every
record is the real one) with a flat FAISS index over it, then measures, best of ``--repeat``
with the page cache warm (CPU costs, not disk reads):

* ``open``: ``FeatureStore(path)`` + the items table: the meta's own sha256, the format and
  field checks, one ``stat`` per recorded file, the commit markers (always done);
* ``read_plain``: every shard ``np.load``-ed and concatenated, no check at all (the floor);
* ``read_checked``: ``store.raw()`` as readers do it: per shard its size, sampled digest,
  rows against the items, and the finiteness check;
* ``finite``: the finiteness check alone over all rows;
* ``sha256_all``: hashing every shard array in full (what checking every byte on first read
  would add);
* ``index_load``: ``Index.load`` (size, the meta's sha256, sampled digest) against
  ``index_sha256``: a full hash of the index file;
* ``verify``: ``FeatureStore.verify()`` (``deepfeat info --verify``), everything hashed.

Writes JSON and prints each cost with its ratio to the plain read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def best(fn, repeat: int) -> float:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def build(path: Path, rows: int, dim: int, shard_size: int) -> int:
    from deepfeat.store import FeatureStore, ShardItems

    meta = {"model": {"spec": "synthetic"}, "layers": ["f"], "pooling": "gem", "size": "model", "post": "none",
            "features": {"f": {"dim": dim}}}
    store = FeatureStore.create(path, meta)
    rng = np.random.default_rng(0)
    n_shards = -(-rows // shard_size)
    for s in range(n_shards):
        n = min(shard_size, rows - s * shard_size)
        items = ShardItems.empty()
        for i in range(n):
            items.add(s * shard_size + i, f"img/{s}/{i}.jpg", ok=True, width=640, height=480, offset=i)
        store.commit_shard(s, items, {"f": rng.standard_normal((n, dim), dtype=np.float32)})
    store.consolidate()
    return n_shards


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="where to build the store (default: a temporary folder, removed after)")
    ap.add_argument("--out", default="bench-out/trust_open.json")
    args = ap.parse_args(argv)

    from deepfeat.index import Index
    from deepfeat.search import build_index
    from deepfeat.store import FeatureStore
    from deepfeat.store.checksums import file_digest, quick_problem, record_file
    from deepfeat.store.integrity import nonfinite_problem

    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-trust-"))
    path = base / "store"
    try:
        t = time.perf_counter()
        n_shards = build(path, args.rows, args.dim, args.shard_size)
        build_s = time.perf_counter() - t
        build_index(FeatureStore(path), kind="flat")
        arrays = sorted((path / "shards").glob("*.f.npy"))
        nbytes = sum(f.stat().st_size for f in arrays)

        def open_store():
            FeatureStore(path).items()

        def read_plain():
            np.concatenate([np.load(f, mmap_mode="r") for f in arrays])

        def read_checked():
            FeatureStore(path).raw()

        x = FeatureStore(path).raw()
        res_s = {
            "open": best(open_store, args.repeat),
            "read_plain": best(read_plain, args.repeat),
            "read_checked": best(read_checked, args.repeat),
            "finite": best(lambda: nonfinite_problem(path, x, list), args.repeat),
            "sha256_all": best(lambda: [file_digest(f) for f in arrays], 1),
            "index_load": best(lambda: Index.load(path / "index"), args.repeat),
            "index_sha256": best(lambda: file_digest(path / "index/index.faiss"), 1),
        }
        t = time.perf_counter()
        report = FeatureStore(path).verify()
        res_s["verify"] = time.perf_counter() - t
        assert report.ok, [c for c in report.checks if c.status != "ok"][:3]
        # a local-feature section's shard file (1024 images x 100 keypoints x 128-D float16, as
        # deepfeat.localfeat.cache writes them): recording it rewrites meta.json, which here holds the
        # records of every shard; checking it on read is a stat and the sampled digest
        section = path / "local" / "bench"
        section.mkdir(parents=True)
        f = section / "000000.npz"
        np.savez(f, desc=np.zeros((102_400, 128), np.float16), counts=np.full(1024, 100, np.int64))
        store = FeatureStore(path)
        res_s["section_record"] = best(lambda: record_file(store, f), args.repeat)
        rec = store.meta["checksums"]["files"]["local/bench/000000.npz"]
        res_s["section_check"] = best(lambda: quick_problem(f, rec), args.repeat)
        meta_kib = (path / "meta.json").stat().st_size / 1024
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    plain = res_s["read_plain"]
    res = {
        "benchmark": "bench_trust_open",
        "command": "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv)),
        "rows": args.rows, "dim": args.dim, "shards": n_shards, "arrays_mib": round(nbytes / 2**20, 1),
        "build_s": round(build_s, 1), "meta_json_kib": round(meta_kib, 1),
        "seconds": {k: round(v, 4) for k, v in res_s.items()},
        "ratio_to_plain_read": {k: round(v / plain, 3) for k, v in res_s.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg": [round(v, 2) for v in os.getloadavg()]},
    }
    print(f"store: {args.rows} x {args.dim} float32 in {n_shards} shards ({res['arrays_mib']} MiB of arrays), "
          f"built in {build_s:.0f} s")
    for k, v in res_s.items():
        print(f"{k:>13}: {v:8.3f} s  ({v / plain:5.2f} x the plain read)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
