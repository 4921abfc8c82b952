"""What the store's checksums cost: at commit (hashing each shard), on open (size checks), on --verify.

    python benchmarks/bench_checksums.py
    python benchmarks/bench_checksums.py --rows 100000 --dim 1280 --shard-size 1024 --out bench-out/checksums.json

Builds a synthetic store (random float32 features, ``--rows`` x ``--dim`` in shards of
``--shard-size``) with :meth:`FeatureStore.commit_shard`, then, in one run:

* commit: the time of committing every shard against the time of hashing the same
  arrays alone (:func:`deepfeat.store.checksums.file_digest`), i.e. the share of a commit
  spent recording checksums;
* open: ``FeatureStore(path).vectors()`` (every shard read, each file's size checked
  against meta.json) against the same store with its checksum records removed (an old
  store: no checks), alternating, best of ``--repeat``;
* verify: ``FeatureStore.verify()`` (every file hashed, shapes checked), in MB/s.

The page cache is warm for all of them (the files were just written): the figures are
CPU costs, not disk reads. Writes JSON and prints the ratios.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", help="where to build the store (default: a temporary folder, removed after)")
    ap.add_argument("--out", default="bench-out/checksums.json")
    args = ap.parse_args(argv)

    from deepfeat.store import FeatureStore, ShardItems
    from deepfeat.store.checksums import file_digest

    base = Path(args.dir or tempfile.mkdtemp(prefix="bench-checksums-"))
    path = base / "store"
    rng = np.random.default_rng(0)
    meta = {"model": {"spec": "synthetic"}, "layers": ["f"], "pooling": "gem", "size": "model", "post": "none",
            "features": {"f": {"dim": args.dim}}}
    try:
        store = FeatureStore.create(path, meta)
        commit_s = hash_s = 0.0
        n_shards = -(-args.rows // args.shard_size)
        for s in range(n_shards):
            n = min(args.shard_size, args.rows - s * args.shard_size)
            items = ShardItems.empty()
            for i in range(n):
                items.add(s * args.shard_size + i, f"img/{s}/{i}.jpg", ok=True, width=640, height=480, offset=i)
            x = rng.standard_normal((n, args.dim), dtype=np.float32)
            t = time.perf_counter()
            store.commit_shard(s, items, {"f": x})
            commit_s += time.perf_counter() - t
            t = time.perf_counter()
            file_digest(store.shard_feature_path(s, "f"))
            hash_s += time.perf_counter() - t
        t = time.perf_counter()
        store.consolidate()
        consolidate_s = time.perf_counter() - t
        nbytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

        plain = base / "plain"  # the same store, as one written before checksums (no records)
        shutil.copytree(path, plain)
        m = json.loads((plain / "meta.json").read_text())
        del m["checksums"]
        (plain / "meta.json").write_text(json.dumps(m))

        def open_read(p: Path) -> float:
            t = time.perf_counter()
            FeatureStore(p).vectors()
            return time.perf_counter() - t

        with_checks, without = [], []
        for _ in range(args.repeat):  # alternate, so that background load hits both alike
            with_checks.append(open_read(path))
            without.append(open_read(plain))
        t = time.perf_counter()
        report = FeatureStore(path).verify()
        verify_s = time.perf_counter() - t
        assert report.ok, report.to_dict()
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)

    res = {
        "benchmark": "bench_checksums",
        "command": "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv)),
        "rows": args.rows, "dim": args.dim, "shards": n_shards, "store_mib": round(nbytes / 2**20, 1),
        "commit_s": round(commit_s, 3), "hash_s": round(hash_s, 3),
        "hash_share_of_commit": round(hash_s / commit_s, 3),
        "consolidate_s": round(consolidate_s, 3),
        "open_read_s_with_size_checks": round(min(with_checks), 4),
        "open_read_s_without_checksums": round(min(without), 4),
        "open_ratio": round(min(with_checks) / min(without), 3),
        "verify_s": round(verify_s, 3), "verify_mib_per_s": round(nbytes / 2**20 / verify_s, 1),
        "verify_files": len(report.checks),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg": [round(x, 2) for x in os.getloadavg()]},
    }
    print(f"store: {args.rows} x {args.dim} float32 in {n_shards} shards, {res['store_mib']} MiB")
    print(f"commit: {commit_s:.2f} s for all shards, of which hashing {hash_s:.2f} s "
          f"({res['hash_share_of_commit']:.1%}); consolidate (hash items files) {consolidate_s:.2f} s")
    print(f"open + read all vectors: {res['open_read_s_with_size_checks']:.3f} s with size checks, "
          f"{res['open_read_s_without_checksums']:.3f} s without checksums: ratio {res['open_ratio']:.2f}")
    print(f"verify (hash everything): {verify_s:.2f} s, {res['verify_mib_per_s']:.0f} MiB/s, "
          f"{len(report.checks)} files")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
