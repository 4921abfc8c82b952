#!/usr/bin/env python
"""Duplicate groups at scale: deepfeat's blocked k-NN (never N x N) against imagededup's
``find_duplicates`` on the same encodings, each size run in its own process so that its
peak memory (ru_maxrss) is its own, side by side in one run.

Vectors: the real descriptors of a store (``--store``), projected to ``--dim`` by PCA, then
synthetic rows drawn from a Gaussian with the same mean and covariance, L2-normalised; a
fraction ``--planted`` of rows gets a near copy (noise added so the cosine is about 0.95).
Reported: seconds, peak RSS, recall of the planted pairs, groups.

    python benchmarks/bench_duplicates_scale.py --store dup-store --sizes 10000,20000,40000 \\
        --imagededup-max 40000 --json dup-scale.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def imagededup_cnn():
    """imagededup's CNN method without its constructor, which downloads MobileNet weights: its
    duplicate search over given encodings needs only a logger and ``verbose``."""
    import logging

    from imagededup.methods import CNN

    cnn = CNN.__new__(CNN)
    cnn.verbose = False
    cnn.logger = logging.getLogger("imagededup")
    return cnn


def make_vectors(store: str, n: int, dim: int, planted: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N x dim unit float32 vectors, P x 2 planted pairs)."""
    from deepfeat.store import FeatureStore

    real = FeatureStore(store).vectors().astype(np.float64)
    mean = real.mean(0)
    vt = np.linalg.svd(real - mean, full_matrices=False)[2]
    basis = vt[:dim]
    proj = (real - mean) @ basis.T
    rng = np.random.default_rng(seed)
    n_copies = int(n * planted)
    n_base = n - n_copies
    chol = np.linalg.cholesky(np.cov(proj, rowvar=False) + 1e-9 * np.eye(dim)).astype(np.float32)
    base = np.empty((n_base, dim), dtype=np.float32)
    n_real = min(len(proj), n_base)
    base[:n_real] = proj[:n_real]
    for s in range(n_real, n_base, 100_000):  # in float32 blocks: the vectors, not their generation, set the memory
        e = min(s + 100_000, n_base)
        base[s:e] = rng.standard_normal((e - s, dim), dtype=np.float32) @ chol.T
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    src = rng.choice(n_base, size=n_copies, replace=False)
    noise = rng.standard_normal((n_copies, dim)).astype(np.float32)
    noise *= 0.33 / np.sqrt(dim)  # cosine about 0.95 with its source
    copies = base[src] + noise
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    x = np.ascontiguousarray(np.concatenate([base, copies]), dtype=np.float32)
    return x, np.stack([src, np.arange(n_base, n)], 1)


def _rss_mib() -> float:
    """This process's resident memory now (Linux), MiB: what it held before the grouping."""
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * resource.getpagesize() / 2**20, 1)


def run_one(method: str, store: str, n: int, dim: int, planted: float, threshold: float, kind: str) -> dict:
    x, truth = make_vectors(store, n, dim, planted)
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    if method == "deepfeat":
        from deepfeat.collection.duplicates import group_vectors

        groups, pairs = group_vectors(x, threshold, k=10, kind=kind)
        found = set(zip(pairs.a.tolist(), pairs.b.tolist()))
        n_groups = len(groups)
    else:
        enc = {str(i): x[i] for i in range(n)}
        dups = imagededup_cnn().find_duplicates(encoding_map=enc, min_similarity_threshold=threshold,
                                                  num_sim_workers=0)
        found = {tuple(sorted((int(a), int(b)))) for a, bs in dups.items() for b in bs}
        n_groups = None
    sec = time.perf_counter() - t0
    hit = sum((min(a, b), max(a, b)) in found for a, b in truth.tolist())
    return {"method": method, "n": n, "dim": dim, "seconds": round(sec, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_before_mib": rss_before, "vectors_mib": round(x.nbytes / 2**20, 1),
            "planted_recall": round(hit / max(len(truth), 1), 4), "pairs": len(found), "groups": n_groups,
            "index_kind": kind if method == "deepfeat" else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a store whose descriptors seed the vectors")
    ap.add_argument("--sizes", default="10000,20000,40000")
    ap.add_argument("--imagededup-max", type=int, default=40000, help="largest size given to imagededup")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--planted", type=float, default=0.01)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--kind", default="auto", help="deepfeat's index kind (default auto)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # method:n, run in a child process
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.one:
        method, n = args.one.split(":")
        print(json.dumps(run_one(method, args.store, int(n), args.dim, args.planted, args.threshold, args.kind)))
        return 0
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for method in ("deepfeat", "imagededup"):
            if method == "imagededup" and n > args.imagededup_max:
                continue
            cmd = [sys.executable, __file__, "--store", args.store, "--dim", str(args.dim), "--planted",
                   str(args.planted), "--threshold", str(args.threshold), "--kind", args.kind, "--one", f"{method}:{n}"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{method} at {n}: failed ({out.returncode}) {out.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{method:10s} n={n:>8d}  {row['seconds']:8.2f}s  peak {row['peak_rss_mib']:8.1f} MiB "
                  f"(before {row['rss_before_mib']:.0f}, vectors {row['vectors_mib']:.0f})  "
                  f"planted recall {row['planted_recall']:.3f}  pairs {row['pairs']}", flush=True)
    by = {(r["method"], r["n"]): r for r in rows}
    for n in sorted({r["n"] for r in rows}):
        d, i = by.get(("deepfeat", n)), by.get(("imagededup", n))
        if d and i:
            print(f"n={n}: imagededup / deepfeat time {i['seconds'] / max(d['seconds'], 1e-9):.1f}x, "
                  f"peak memory {i['peak_rss_mib'] / d['peak_rss_mib']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
