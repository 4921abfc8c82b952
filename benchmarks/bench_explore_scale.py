"""The collection tools on N synthetic vectors (default 1,000,000 x 1280, the default descriptor's
dimension): k-means (FAISS), the k-NN outlier scores (FAISS: IVF above 200,000 vectors), the
classifier's prediction (fitted on a 5,000-row sample) and the map's layout of a subsample (the rest
placed by their neighbours). Each step's wall time and the process's peak RSS after it (ru_maxrss,
which only grows: read the step that raised it; ``peak_over_array_gb`` = that minus the array's own
size) are printed and written as JSON. --check-rows R: R rows' outlier scores computed exactly
(brute force over all N) against the ones of the candidate search (N >= 200,000).

    python benchmarks/bench_explore_scale.py --n 1000000 --dim 1280 -o bench-explore-scale.json

The vectors: --groups Gaussian groups (centres drawn on the unit sphere, spread 0.6 per dimension
relative to a centre's norm), L2-normalised, generated in chunks into one N x D float32 array
(N * D * 4 bytes: 5.1 GB at the default size, the floor of any step's memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import faiss
import numpy as np

from deepfeat.collection.classifier import fit_classifier
from deepfeat.collection.clusters import agreement, cluster
from deepfeat.collection.layout import layout
from deepfeat.collection.outliers import knn_outlier_scores


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux


def synthetic(n: int, dim: int, groups: int, seed: int, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, groups, n)
    X = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        block = centres[y[s:e]] + rng.standard_normal((e - s, dim)).astype(np.float32) * (0.6 / np.sqrt(dim))
        X[s:e] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return X, y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--groups", type=int, default=20)
    ap.add_argument("--map-points", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-rows", type=int, default=0,
                    help="score this many rows exactly (brute force over all N) and compare")
    ap.add_argument("-o", "--output", default="bench-explore-scale.json")
    args = ap.parse_args()
    out: dict = {"n": args.n, "dim": args.dim, "groups": args.groups, "steps": {}}

    def step(name: str, t0: float, **extra) -> None:
        out["steps"][name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(peak_rss_gb(), 2),
                              "peak_over_array_gb": round(peak_rss_gb() - args.n * args.dim * 4 / 2**30, 2), **extra}
        print(f"{name}: {out['steps'][name]}", flush=True)

    t = time.perf_counter()
    X, y = synthetic(args.n, args.dim, args.groups, args.seed)
    step("generate", t, array_gb=round(X.nbytes / 2**30, 2))

    t = time.perf_counter()
    c = cluster(X, args.groups, n_representatives=5)
    step("kmeans", t, k=c.k, **{k: round(v, 4) for k, v in agreement(y, c.labels).items()})

    t = time.perf_counter()
    scores = knn_outlier_scores(X, 10)
    step("outliers_knn10", t, score_mean=round(float(scores.mean()), 4))
    if args.check_rows:  # the exact scores of a few rows (brute force over all N), against the candidates'
        t = time.perf_counter()
        rows = np.sort(np.random.default_rng(args.seed).choice(args.n, args.check_rows, replace=False))
        D, I = faiss.knn(X[rows], X, 11, faiss.METRIC_INNER_PRODUCT)  # rows are unit: cosine
        own = I == rows[:, None]
        keep = np.where(own.any(axis=1, keepdims=True), ~own, np.arange(11) < 10)
        exact = 1.0 - (D * keep).sum(axis=1) / 10
        diff = scores[rows] - exact
        step("outliers_check_exact", t, rows=args.check_rows, max_abs_diff=round(float(np.abs(diff).max()), 4),
             mean_diff=round(float(diff.mean()), 5), exact_score_mean=round(float(exact.mean()), 4))
    del scores

    rng = np.random.default_rng(args.seed)
    train = rng.choice(args.n, min(args.n, 5000), replace=False)
    classes = [f"g{i}" for i in range(args.groups)]
    t = time.perf_counter()
    clf = fit_classifier(X[train], y[train], classes, {}, folds=3)
    step("classifier_fit_5000", t, method=clf.method)
    t = time.perf_counter()
    idx, _ = clf.predict(X)
    step("classifier_predict_all", t, accuracy=round(float((idx == y).mean()), 4))
    del idx

    t = time.perf_counter()
    lay = layout(X, "pca", max_points=args.map_points)
    step("map_layout", t, how=lay.how)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
