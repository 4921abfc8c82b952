"""Search benchmark: FAISS flat / IVF / IVF-PQ / HNSW (deepfeat.index.Index) vs numpy brute force.

    python benchmarks/bench_search.py                      # 1,000,000 x 128, 1000 queries, k=10
    python benchmarks/bench_search.py --n 200000 --kinds flat,hnsw --out bench-out/small.json

Data: a seeded mixture of Gaussians on the unit sphere (``--clusters``, default n/100
components of ~100 vectors), each component's noise with a power-law spectrum
(variance of the i-th principal direction ~ 1/i, in a random rotation). Uniform random
unit vectors would be the worst case for every approximate method (no structure, all
distances alike) and nothing like image descriptors, which form groups (the same
landmark, object, near-duplicates) and whose PCA spectra decay fast (why PCA-whitening
to a few hundred dimensions works). Queries are fresh draws from the same mixture, not
database rows.

Every method answers the same queries in one run. Exact ground truth is the numpy
brute force itself (chunked matmul + argpartition, :func:`deepfeat.index.brute_force_search`),
so its recall is 1 by definition and FAISS flat's recall checks both. Reported per
method: build time (train + add), batch queries/s and its ratio to numpy, latency of
one query at a time, recall@k against exact, expected memory (deepfeat's estimate) and
the serialised size. Approximate kinds also get a sweep of their search parameter
(efSearch / nprobe), which costs searches only. Writes JSON with the configuration,
machine notes and all numbers.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="database vectors (default 1,000,000)")
    ap.add_argument("--d", type=int, default=128, help="dimensions (default 128)")
    ap.add_argument("--nq", type=int, default=1000, help="queries (default 1000)")
    ap.add_argument("--k", type=int, default=10, help="neighbours per query; recall@k (default 10)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="FAISS OpenMP and BLAS threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clusters", type=int, default=None, help="mixture components (default n/100)")
    ap.add_argument(
        "--kinds", default="flat,ivf,ivfpq,hnsw", help="comma-separated index kinds (default flat,ivf,ivfpq,hnsw)"
    )
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time for latency (0: skip)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the efSearch / nprobe sweeps")
    ap.add_argument("--out", default="bench-out/search.json", help="JSON results (default bench-out/search.json)")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # BLAS reads these when numpy is first imported
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import gc
import json
import platform
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from deepfeat.index import Index, brute_force_search, recall_at_k


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mixture(n: int, d: int, clusters: int, seed: int, nq: int, spread: float = 0.8, chunk: int = 100_000):
    """(xb, xq): n + nq unit vectors from a mixture of Gaussians with power-law within-cluster spectra.

    x = normalise(c + z A): c a random unit centre, z ~ N(0, I_d), A = diag(sqrt(lambda)) R
    with lambda_i ~ 1/i scaled to total variance spread^2, R a random rotation. With
    spread = 0.8 a vector's cosine to its centre is ~0.78.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = 1.0 / np.arange(1, d + 1)
    lam *= spread**2 / lam.sum()
    A = (np.sqrt(lam)[:, None] * rotation.T).astype(np.float32)
    out = np.empty((n + nq, d), dtype=np.float32)
    for s in range(0, n + nq, chunk):
        m = min(chunk, n + nq - s)
        x = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, d), dtype=np.float32) @ A
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return np.ascontiguousarray(out[:n]), np.ascontiguousarray(out[n:])


def time_batch(search, xq: np.ndarray, k: int, repeats: int = 1):
    """Best of *repeats* timed batch searches (after a small warm-up); returns (seconds, D, I)."""
    search(xq[:8], k)
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = search(xq, k)
        best = min(best, time.perf_counter() - t)
    return best, result[0], result[1]


def time_single(search, xq: np.ndarray, k: int, count: int) -> float | None:
    """Median milliseconds for one query at a time over the first *count* queries."""
    if count <= 0:
        return None
    times = []
    for i in range(min(count, xq.shape[0])):
        q = xq[i : i + 1]
        t = time.perf_counter()
        search(q, k)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


SWEEPS = {"hnsw": ("efSearch", [16, 32, 64, 128, 256, 512]), "ivf": ("nprobe", [1, 4, 8, 16, 32, 64, 128])}
SWEEPS["ivfpq"] = SWEEPS["ivf"]


def machine_notes() -> dict:
    import faiss

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": "none",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "load_average_start": list(os.getloadavg()),
    }


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return "-"


def table(rows: list[dict], k: int) -> str:
    head = ["method", "params", "build s", "queries/s", "x numpy", "ms/query (1 at a time)", f"recall@{k}", "memory"]
    lines = [head]
    numpy_qps = next(r["qps"] for r in rows if r["method"] == "numpy")
    for r in rows:
        mem = "-" if r["memory_bytes"] is None else fmt_bytes(r["memory_bytes"])
        if r.get("file_bytes"):
            mem += f" (file {fmt_bytes(r['file_bytes'])})"
        lines.append(
            [
                r["method"],
                r["params_text"],
                "-" if r["build_s"] is None else f"{r['build_s']:.1f}",
                f"{r['qps']:,.0f}",
                f"{r['qps'] / numpy_qps:.1f}x",
                "-" if r["single_ms"] is None else f"{r['single_ms']:.2f}",
                f"{r['recall']:.4f}",
                mem,
            ]
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(out)


def main(args: argparse.Namespace) -> int:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    clusters = args.clusters or max(1, args.n // 100)
    t_start = time.perf_counter()
    notes = machine_notes()
    log(f"{args.n:,} x {args.d} database, {args.nq} queries, {clusters} clusters, threads={args.threads}")

    t = time.perf_counter()
    xb, xq = mixture(args.n, args.d, clusters, args.seed, args.nq)
    gen_s = time.perf_counter() - t
    log(f"data generated in {gen_s:.1f} s")

    rows: list[dict] = []
    sweeps: dict[str, list[dict]] = {}

    # exact ground truth = the numpy baseline
    secs, D_true, I_true = time_batch(lambda q, k: brute_force_search(q, xb, k, "ip"), xq, args.k)
    single = time_single(lambda q, k: brute_force_search(q, xb, k, "ip"), xq, args.k, args.single)
    rows.append(
        {
            "method": "numpy",
            "kind": None,
            "params": {},
            "params_text": "matmul + argpartition",
            "build_s": None,
            "search_s": secs,
            "qps": args.nq / secs,
            "single_ms": single,
            "recall": 1.0,
            "memory_bytes": xb.nbytes,
            "file_bytes": None,
        }
    )
    log(f"numpy brute force: {args.nq / secs:,.0f} queries/s")
    sims = D_true[:, : args.k]
    notes["data"] = {
        "mean_top1_cosine": float(sims[:, 0].mean()),
        f"mean_top{args.k}_cosine": float(sims[:, -1].mean()),
    }

    for kind in kinds:
        log(f"building {kind} ...")
        index = Index.build(xb, kind=kind, metric="ip", seed=args.seed, threads=args.threads)
        meta = index.meta
        log(f"{kind}: built in {meta['build_seconds']:.1f} s (train {meta['train_seconds']:.1f} s) {index}")
        secs, _, I = time_batch(index.search, xq, args.k)
        single = time_single(index.search, xq, args.k, args.single)
        file_bytes = int(faiss.serialize_index(index.faiss_index).nbytes)
        row = {
            "method": f"faiss {kind}",
            "kind": kind,
            "params": index.params,
            "params_text": meta["factory"].replace("IDMap,", "")
            + "".join(f" {p}={index.params[p]}" for p in ("nprobe", "efSearch") if p in index.params),
            "build_s": meta["build_seconds"],
            "train_s": meta["train_seconds"],
            "search_s": secs,
            "qps": args.nq / secs,
            "single_ms": single,
            "recall": recall_at_k(I, I_true, args.k),
            "memory_bytes": meta["memory_bytes"],
            "file_bytes": file_bytes,
        }
        rows.append(row)
        log(f"{kind}: {row['qps']:,.0f} queries/s, recall@{args.k} {row['recall']:.4f}")
        if kind in SWEEPS and not args.no_sweep:
            name, values = SWEEPS[kind]
            default = index.params[name]
            points = []
            for v in values:
                if name == "nprobe" and v > index.params["nlist"]:
                    continue
                index.set_search_params(**{name: v})
                s, _, I = time_batch(index.search, xq, args.k)
                points.append({name: v, "qps": args.nq / s, "recall": recall_at_k(I, I_true, args.k)})
                log(f"  {name}={v}: {args.nq / s:,.0f} queries/s, recall {points[-1]['recall']:.4f}")
            index.set_search_params(**{name: default})
            sweeps[kind] = points
        del index, I
        gc.collect()

    notes["load_average_end"] = list(os.getloadavg())
    total = time.perf_counter() - t_start
    text = table(rows, args.k)
    print(
        f"\n{args.n:,} x {args.d} float32 (unit vectors, {clusters} clusters), {args.nq} queries, k={args.k}, "
        f"threads={args.threads}; total {total:.0f} s\n"
    )
    print(text)
    for kind, points in sweeps.items():
        name = SWEEPS[kind][0]
        print(
            f"\n{kind} {name} sweep: " + ", ".join(f"{p[name]}: {p['recall']:.3f} @ {p['qps']:,.0f}/s" for p in points)
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "bench_search",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {**vars(args), "clusters": clusters, "spectrum": "lambda_i ~ 1/i", "spread": 0.8},
        "machine": notes,
        "data_seconds": gen_s,
        "total_seconds": total,
        "results": rows,
        "sweeps": sweeps,
        "table": text,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
