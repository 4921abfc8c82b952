"""On-disk IVF (deepfeat.index.ondisk) against the in-memory index of the same kind, in one run.

Synthetic clustered N x D float32 vectors, generated block by block from a seed (any slice can be
re-made, so no process ever holds all of them unless it builds the in-memory index). Builds the
on-disk index under ``--max-memory`` (default: a quarter of the raw vectors) with ``--workers``
processes, then, in a separate process, the in-memory index of the same kind and parameters; prints
each build's peak RSS (this process and its workers, ``ru_maxrss``) against the raw size, recall@10
against exact search (chunked brute force over every vector) and the search latency per query.

    python benchmarks/bench_ondisk.py --n 1000000 --d 128 --workers 2
    python benchmarks/bench_ondisk.py --store STORE --kind ivf        # a real store, its rows as queries
    python benchmarks/bench_ondisk.py --store STORE --engine ray      # its shards filled by Ray tasks
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK = 16_384  # generated a block at a time: small next to a chunk, so the source adds little memory


class SyntheticSource:
    """Clustered unit vectors, block *b* generated from seed ``(seed, b)``: reproducible slices."""

    def __init__(self, n: int, d: int, seed: int = 0, clusters: int = 1000):
        self.n, self.d, self.seed = n, d, seed
        self.centres = np.random.default_rng(seed).normal(size=(clusters, d)).astype(np.float32)

    def _block(self, b: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, b))
        m = min(BLOCK, self.n - b * BLOCK)
        x = self.centres[rng.integers(0, len(self.centres), m)]
        x += 0.5 * rng.standard_normal((m, self.d), dtype=np.float32)  # float32 throughout: no float64 temporaries
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            x = self._block(b)
            lo, hi = max(start, b * BLOCK) - b * BLOCK, min(stop, (b + 1) * BLOCK) - b * BLOCK
            parts.append(x[lo:hi])
        return np.arange(start, stop, dtype=np.int64), np.ascontiguousarray(np.concatenate(parts))


def peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest child) peak RSS in MB (Linux ru_maxrss is in KB)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def own_peak_mb() -> float:
    """This process's peak RSS in MB (VmHWM): unlike ru_maxrss, which a process started by
    subprocess keeps from its parent across fork + exec, it counts only this program's memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mb()[0]


class AnonPeak:
    """Peak anonymous (RssAnon) and file-backed (RssFile) resident memory of this process, and the peak of
    the anonymous memory of this process and its child processes (the build's workers) together, sampled
    from /proc every 20 ms while running: mmap'ed file pages (the merge reads the shards and writes the
    lists through mmap) count in ru_maxrss but are page cache the kernel can drop."""

    def __init__(self):
        import threading

        self.anon = self.file = self.tree_anon = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _status(pid) -> dict[str, float]:
        out = {}
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(("RssAnon:", "RssFile:")):
                        out[line.split(":")[0]] = int(line.split()[1]) / 1024
        except OSError:  # the process ended between the listing and the read
            pass
        return out

    @staticmethod
    def _children() -> list[str]:
        me, kids = str(os.getpid()), []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[1] == me:
                            kids.append(pid)
                except (OSError, IndexError):
                    pass
        return kids

    def _sample(self) -> None:
        own = self._status("self")
        self.anon = max(self.anon, own.get("RssAnon", 0.0))
        self.file = max(self.file, own.get("RssFile", 0.0))
        tree = own.get("RssAnon", 0.0) + sum(self._status(p).get("RssAnon", 0.0) for p in self._children())
        self.tree_anon = max(self.tree_anon, tree)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def exact_top(src: SyntheticSource, xq: np.ndarray, k: int) -> np.ndarray:
    best_d = np.full((len(xq), k), -np.inf, np.float32)
    best_i = np.full((len(xq), k), -1, np.int64)
    for lo in range(0, src.n, BLOCK):
        ids, xb = src.rows(lo, min(src.n, lo + BLOCK))
        s = xq @ xb.T
        d = np.concatenate([best_d, s], 1)
        i = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], 1)
        o = np.argsort(-d, 1)[:, :k]
        best_d, best_i = np.take_along_axis(d, o, 1), np.take_along_axis(i, o, 1)
    return best_i


def timed_search(index, xq: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    index.search(xq[:5], k)  # warm-up
    t0 = time.perf_counter()
    I = np.concatenate([index.search(xq[i:i + 1], k)[1] for i in range(len(xq))])  # one query at a time
    return I, (time.perf_counter() - t0) / len(xq) * 1000


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def recall(I: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(I.tolist(), gt.tolist())]))


def child(args) -> int:
    """--in-memory: build the in-memory index of the same kind, parameters and training in this (fresh)
    process, its rows added a chunk at a time (the raw vectors are never all in memory: at 10M x 128 they
    would not fit beside the index on a shared machine), and search it."""
    from deepfeat.index import Index
    from deepfeat.index.checks import _faiss
    from deepfeat.index.faiss_index import _train
    from deepfeat.index.ondisk import CHUNK_ROWS, _training_sample
    from deepfeat.index.plan import plan_index

    faiss = _faiss()
    src = SyntheticSource(args.n, args.d)
    plan = plan_index(args.n, args.d, args.kind, "ip", **json.loads(args.params))
    t0 = time.perf_counter()
    index = faiss.index_factory(args.d, plan.factory, faiss.METRIC_INNER_PRODUCT)
    _train(faiss, index, _training_sample(src, plan.params["train_size"], 0), plan, 0)  # as build_ondisk trains
    for lo in range(0, args.n, CHUNK_ROWS):
        index.add_with_ids(*reversed(src.rows(lo, min(args.n, lo + CHUNK_ROWS))))
    build = time.perf_counter() - t0
    index = Index(index, {"kind": plan.kind, "params": dict(plan.params)})
    xq = np.load(args.queries_file)
    I, ms = timed_search(index, xq, 10)
    np.save(args.result, I)
    print(json.dumps({"build_s": build, "ms_per_query": ms, "peak_rss_mb": own_peak_mb()}))
    return 0


def store_run(args) -> int:
    """--store: the store's vectors as queries against its on-disk and in-memory index of the same kind."""
    from deepfeat.index import Index
    from deepfeat.index.ondisk import StoreSource, build_ondisk
    from deepfeat.index.plan import plan_index
    from deepfeat.store import FeatureStore

    store = FeatureStore(args.store)
    xb = store.vectors()
    params = dict(plan_index(len(xb), xb.shape[1], args.kind).params)
    if args.nprobe:
        params["nprobe"] = args.nprobe
    work = Path(tempfile.mkdtemp(prefix="deepfeat-ondisk-store-"))
    try:
        disk = build_ondisk(StoreSource(args.store), work / "idx", kind=args.kind, workers=args.workers,
                            shard_rows=max(1, len(xb) // 4), seed=0, engine=args.engine, **params)
        one = build_ondisk(StoreSource(args.store), work / "one", kind=args.kind, workers=1, seed=0,
                           shard_rows=len(xb), **params)  # one shard, in this process
        mem = Index.build(xb, kind=args.kind, seed=0, **params)
        gt = np.argsort(-(xb @ xb.T), axis=1)[:, :10]
        I_disk, ms_disk = timed_search(disk, xb, 10)
        I_mem, ms_mem = timed_search(mem, xb, 10)
        I_one = one.search(xb, 10)[1]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"store": args.store, "n": len(xb), "d": int(xb.shape[1]), "kind": args.kind, "params": params,
           "shards": disk.meta["storage"]["shards"], "recall@10": {"ondisk": recall(I_disk, gt), "in_memory":
           recall(I_mem, gt)}, "ms_per_query": {"ondisk": ms_disk, "in_memory": ms_mem},
           "same_results_fraction": float(np.mean(I_disk == I_mem)), "engine": args.engine,
           "same_as_one_shard_fraction": float(np.mean(I_disk == I_one))}
    print(f"store {args.store}: {len(xb)} x {xb.shape[1]}, {args.kind} {params}, on-disk in {res['shards']} shards "
          f"({args.workers} at a time, engine {args.engine}); identical top-10 ids to one shard built in one process: "
          f"{res['same_as_one_shard_fraction']:.4f}")
    print(f"recall@10 on-disk {res['recall@10']['ondisk']:.4f}, in-memory {res['recall@10']['in_memory']:.4f}; "
          f"ms/query {ms_disk:.3f} vs {ms_mem:.3f}; identical top-10 ids: {res['same_results_fraction']:.4f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--kind", default="ivf", choices=["ivf", "ivfpq"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-memory-mb", type=float, default=None, help="default: a quarter of the raw vectors")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--nlist", type=int, default=None, help="default: the kind's (plan_index); training is 64 x nlist rows")
    ap.add_argument("--engine", default="local", choices=["local", "ray"], help="who fills the shards")
    ap.add_argument("--store", help="a feature store instead of synthetic vectors (its rows are the queries)")
    ap.add_argument("--out", default="bench-out/ondisk.json")
    ap.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--queries-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_memory:
        return child(args)
    if args.store:
        return store_run(args)

    from deepfeat.index.ondisk import build_ondisk
    from deepfeat.index.plan import plan_index

    raw_mb = args.n * args.d * 4 / 2**20
    plan = plan_index(args.n, args.d, args.kind, **({"nlist": args.nlist} if args.nlist else {}))
    params = {k: v for k, v in plan.params.items()}
    if args.nprobe:
        params["nprobe"] = args.nprobe
    work = Path(tempfile.mkdtemp(prefix="deepfeat-ondisk-"))
    try:
        src = SyntheticSource(args.n, args.d)
        xq = SyntheticSource(args.queries, args.d, seed=99).rows(0, args.queries)[1]
        np.save(work / "xq.npy", xq)
        subprocess.run([sys.executable, "-c", "import numpy, faiss, deepfeat.index.ondisk"], check=True)
        idle_child = peak_rss_mb()[1]  # what a worker process holds before any vector: Python, numpy, FAISS
        base = peak_rss_mb()[0]
        # default: the whole build (this process and its workers, interpreters included) within a quarter
        # of the raw vectors, so the data's bound is that less the processes' own memory
        max_mb = args.max_memory_mb or raw_mb / 4 - base - args.workers * idle_child
        _log(f"building on-disk {args.kind} of {args.n} x {args.d} within --max-memory {max_mb:.0f} MB")
        t0 = time.perf_counter()
        with AnonPeak() as sampled:
            disk = build_ondisk(src, work / "idx", kind=args.kind, max_memory=int(max_mb * 2**20),
                                workers=args.workers, seed=0, engine=args.engine, **params)
        build = time.perf_counter() - t0
        main_rss, worker_rss = peak_rss_mb()
        _log(f"built in {build:.0f} s; searching it memory-mapped")
        with AnonPeak() as searching:
            I_disk, ms_disk = timed_search(disk, xq, 10)
        _log("exact search for the ground truth")
        gt = exact_top(src, xq, 10)
        _log("the in-memory index of the same kind, in a child process")
        mem = subprocess.run([sys.executable, __file__, "--in-memory", "--n", str(args.n), "--d", str(args.d),
                              "--kind", args.kind, "--params", json.dumps(params), "--queries-file", str(work / "xq.npy"),
                              "--result", str(work / "mem.npy")], capture_output=True, text=True, check=True)
        m = json.loads(mem.stdout.strip().splitlines()[-1])
        I_mem = np.load(work / "mem.npy")
        res = {
            "n": args.n, "d": args.d, "kind": args.kind, "params": params, "raw_mb": raw_mb, "max_memory_mb": max_mb,
            "shards": disk.meta["storage"]["shards"], "workers": args.workers,
            "ondisk": {"build_s": build, "peak_rss_main_mb": main_rss, "peak_rss_worker_mb": worker_rss,
                       "rss_before_build_mb": base, "idle_worker_rss_mb": idle_child,
                       "main_anon_peak_mb": sampled.anon, "main_file_peak_mb": sampled.file,
                       "build_anon_peak_all_processes_mb": sampled.tree_anon, "search_anon_peak_mb": searching.anon,
                       "search_file_peak_mb": searching.file, "ms_per_query": ms_disk, "recall@10": recall(I_disk, gt)},
            "in_memory": {"build_s": m["build_s"], "peak_rss_mb": m["peak_rss_mb"], "ms_per_query": m["ms_per_query"],
                          "recall@10": recall(I_mem, gt)},
            "same_results_fraction": float(np.mean(I_disk == I_mem)),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    o, i = res["ondisk"], res["in_memory"]
    print(f"{args.n} x {args.d} float32 = {raw_mb:.0f} MB raw; {args.kind} {params}; on-disk in {res['shards']} shards, "
          f"{args.workers} workers, --max-memory {max_mb:.0f} MB (load average {os.getloadavg()[0]:.1f})")
    print(f"{'':<10} {'build s':>8} {'peak RSS MB':>12} {'RSS/raw':>8} {'ms/query':>9} {'recall@10':>10}")
    peak = max(o["peak_rss_main_mb"], o["peak_rss_worker_mb"])
    print(f"{'on-disk':<10} {o['build_s']:8.1f} {peak:12.0f} {peak / raw_mb:8.2f} {o['ms_per_query']:9.2f} "
          f"{o['recall@10']:10.3f}   (main {o['peak_rss_main_mb']:.0f} MB, largest worker {o['peak_rss_worker_mb']:.0f})")
    print(f"{'in-memory':<10} {i['build_s']:8.1f} {i['peak_rss_mb']:12.0f} {i['peak_rss_mb'] / raw_mb:8.2f} "
          f"{i['ms_per_query']:9.2f} {i['recall@10']:10.3f}")
    print(f"on-disk build, main process: anonymous memory peak {o['main_anon_peak_mb']:.0f} MB (before the build "
          f"{o['rss_before_build_mb']:.0f} MB), file-backed (mmap) peak {o['main_file_peak_mb']:.0f} MB; a worker "
          f"process holds {o['idle_worker_rss_mb']:.0f} MB before any vector")
    print(f"on-disk build, all processes together (sampled every 20 ms): anonymous memory peak "
          f"{o['build_anon_peak_all_processes_mb']:.0f} MB = {o['build_anon_peak_all_processes_mb'] / raw_mb:.3f} of "
          f"the raw vectors (goal <= 0.25); searching memory-mapped: anonymous {o['search_anon_peak_mb']:.0f} MB, "
          f"file-backed (lists pages) {o['search_file_peak_mb']:.0f} MB")
    print(f"on-disk / in-memory latency {o['ms_per_query'] / i['ms_per_query']:.2f}x; identical top-10 ids: "
          f"{res['same_results_fraction']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
