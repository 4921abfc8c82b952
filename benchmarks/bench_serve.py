"""Search service benchmark: requests/s and latency of `deepfeat serve` on loopback.

    python benchmarks/bench_serve.py /tmp/flowers17-store
    python benchmarks/bench_serve.py STORE --clients 4 --requests 120 --duration 30 --out bench-out/serve.json

For each server configuration (``--configs``; default: micro-batching on, max batch 16
and a 5 ms window, against batching off, max batch 1) a real server process
(``python -m deepfeat.serve``) is started on a free 127.0.0.1 port and driven by
client threads, each with its own keep-alive ``httpx`` connection:

* ``id``: ``GET /api/search/item/{id}?k=10`` for random stored ids (FAISS only);
* ``upload``: ``POST /api/search/upload?k=10`` of the store's own image files, read
  once into memory (receive, decode, embed with the model, search), with one client
  (latency alone) and with ``--clients`` clients (throughput under contention).

Each (configuration, mode, clients) is bounded by ``--requests`` and ``--duration``
(whichever comes first), split over ``--rounds`` rounds that interleave the
configurations (all servers stay up; one is loaded at a time), after a few warm-up
requests per round: on a shared machine, a change of background load then hits
every configuration alike instead of favouring whichever ran first. Reported per run: completed requests, errors, req/s,
p50/p95/p99 latency, and for uploads the server's own count of forward passes (mean
batch size). Writes JSON with the configuration, the machine's load and all numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIGS = {
    "batched": ["--max-batch", "16", "--batch-window-ms", "5"],  # the defaults
    "unbatched": ["--max-batch", "1"],
    "faiss2": ["--search-threads", "2"],  # FAISS with 2 OpenMP threads per search (default 1)
    "torch1": ["--torch-threads", "1"],  # batched, one PyTorch thread per forward pass
    "torch1-unbatched": ["--torch-threads", "1", "--max-batch", "1"],
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("store", help="a feature store (e.g. built from ../shared/data/flowers17)")
    ap.add_argument("--root", help="base of the store's relative image paths (default: the current directory)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    ap.add_argument("--requests", type=int, default=120,
                    help="requests per configuration, mode and client count at most (default 120)")
    ap.add_argument("--duration", type=float, default=30.0,
                    help="seconds per configuration, mode and client count at most (default 30)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleave the configurations in this many rounds, so that a change in the machine's "
                         "load hits them alike (default 3)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed requests before each run (default 4)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--images", type=int, default=32, help="distinct store images uploaded in turn (default 32)")
    ap.add_argument("--configs", default="batched,unbatched", help=f"server configurations: {', '.join(CONFIGS)}")
    ap.add_argument("--modes", default="id,upload", help="id, upload (default both)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/serve.json", help="JSON results (default bench-out/serve.json)")
    return ap.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m deepfeat.serve` in a subprocess, up until stopped."""

    def __init__(self, store: str, root: str | None, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "deepfeat.serve", store, "--port", str(self.port), "--log-level", "warning",
               "--limit-concurrency", "256", *extra]
        if root:
            cmd += ["--root", root]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def wait_ready(self, client, timeout: float = 300.0) -> float:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self.log))
            try:
                if client.get(f"{self.url}/api/health").json().get("status") == "ok":
                    return time.perf_counter() - t0
            except httpx.TransportError:  # not listening yet
                time.sleep(0.2)
                continue
            time.sleep(0.2)
        raise RuntimeError("server did not start in time:\n" + "".join(self.log))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = (len(xs) - 1) * q
    lo, hi = int(i), min(int(i) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def store_files(store, root: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of *n* of the store's own image files, drawn with *seed*, read into memory."""
    rng = random.Random(seed)
    files = []
    for p in rng.sample(store.paths, min(n, len(store.paths))):
        f = Path(p if os.path.isabs(p) else os.path.join(root, p))
        files.append((f.name, f.read_bytes()))
    return files


def run_load(url: str, make_request, clients: int, requests: int, duration: float, warmup: int) -> dict:
    """*clients* threads issue requests until *requests* are done or *duration* seconds pass."""
    import httpx

    lock = threading.Lock()
    counter = {"issued": 0}
    lat: list[float] = []
    errors: list[str] = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(warmup):
            make_request(c, i).raise_for_status()
    stop_at = [0.0]

    def worker(seed: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    if counter["issued"] >= requests or time.perf_counter() > stop_at[0]:
                        return
                    counter["issued"] += 1
                    n = counter["issued"]
                t = time.perf_counter()
                try:
                    r = make_request(c, n * 7919 + seed)
                    ok = r.status_code == 200
                    msg = f"{r.status_code} {r.text[:100]}"
                except httpx.HTTPError as e:
                    ok, msg = False, f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t
                with lock:
                    (lat.append(dt) if ok else errors.append(msg))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": lat, "errors": errors, "seconds": time.perf_counter() - t0}


def summarise(clients: int, parts: list[dict]) -> dict:
    """Pool the latencies of a configuration's runs over the rounds."""
    lat = [x for p in parts for x in p["latencies"]]
    errors = [e for p in parts for e in p["errors"]]
    wall = sum(p["seconds"] for p in parts)
    return {"clients": clients, "completed": len(lat), "errors": len(errors), "error_samples": errors[:3],
            "seconds": round(wall, 3), "req_per_s": round(len(lat) / wall, 2) if wall else 0.0,
            "p50_ms": round(percentile(lat, 0.50) * 1000, 1), "p95_ms": round(percentile(lat, 0.95) * 1000, 1),
            "p99_ms": round(percentile(lat, 0.99) * 1000, 1),
            "mean_ms": round(sum(lat) / len(lat) * 1000, 1) if lat else float("nan"),
            "req_per_s_by_round": [round(len(p["latencies"]) / p["seconds"], 2) for p in parts]}


def main(argv=None) -> int:
    args = parse_args(argv)
    import httpx

    from deepfeat.store import FeatureStore

    load_start = [round(x, 2) for x in os.getloadavg()]
    store = FeatureStore(args.store)
    ids = [int(i) for i in store.ids]
    files = store_files(store, args.root or os.getcwd(), args.images, args.seed)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for name in configs:
        if name not in CONFIGS:
            sys.exit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")

    def by_id(c, n):
        return c.get(f"/api/search/item/{ids[n % len(ids)]}", params={"k": args.k})

    def by_upload(c, n):
        name, data = files[n % len(files)]
        return c.post("/api/search/upload", params={"k": args.k}, files={"file": (name, data, "image/jpeg")})

    runs = []
    print(f"store {args.store}: {len(ids)} items; {args.clients} clients; at most {args.requests} requests or "
          f"{args.duration:.0f} s per configuration and mode, in {args.rounds} interleaved rounds; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    plan = []
    if "id" in modes:
        plan.append(("id", by_id, args.clients))
    if "upload" in modes:
        plan += [("upload", by_upload, 1), ("upload", by_upload, args.clients)]
    servers = {}
    with httpx.Client(timeout=30) as probe:
        try:
            for cname in configs:  # all up at once; only one is ever under load
                servers[cname] = Server(args.store, args.root, CONFIGS[cname])
            startup = {c: round(srv.wait_ready(probe), 1) for c, srv in servers.items()}
            print(f"{'config':10s} {'mode':7s} {'clients':>7s} {'done':>5s} {'err':>4s} {'req/s':>7s} "
                  f"{'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'batch':>6s}  req/s by round")
            for mode, fn, clients in plan:
                parts = {c: [] for c in configs}
                stats = {c: [0, 0] for c in configs}  # forward passes, requests
                for rnd in range(args.rounds):
                    order = configs if rnd % 2 == 0 else configs[::-1]
                    for cname in order:
                        srv = servers[cname]
                        before = probe.get(f"{srv.url}/api/health").json()["inference"]
                        parts[cname].append(run_load(srv.url, fn, clients, -(-args.requests // args.rounds),
                                                     args.duration / args.rounds, args.warmup))
                        after = probe.get(f"{srv.url}/api/health").json()["inference"]
                        stats[cname][0] += after["forward_passes"] - before["forward_passes"]
                        stats[cname][1] += after["requests"] - before["requests"]
                for cname in configs:
                    res = summarise(clients, parts[cname])
                    passes, reqs = stats[cname]
                    res.update(config=cname, server_args=CONFIGS[cname], mode=mode, startup_s=startup[cname],
                               forward_passes=passes, mean_batch=round(reqs / passes, 2) if passes else None,
                               load_avg=round(os.getloadavg()[0], 2))
                    runs.append(res)
                    mb = f"{res['mean_batch']:.2f}" if res["mean_batch"] else "-"
                    print(f"{cname:10s} {mode:7s} {clients:7d} {res['completed']:5d} {res['errors']:4d} "
                          f"{res['req_per_s']:7.2f} {res['p50_ms']:8.1f} {res['p95_ms']:8.1f} {res['p99_ms']:8.1f} "
                          f"{mb:>6s}  {res['req_per_s_by_round']}", flush=True)
        finally:
            for srv in servers.values():
                srv.stop()

    # side-by-side ratios: every configuration against the first (the defaults, unless --configs says otherwise)
    ratios = []
    base = configs[0]
    for r in runs:
        if r["config"] == base:
            continue
        ref = next(o for o in runs if o["config"] == base and o["mode"] == r["mode"] and o["clients"] == r["clients"])
        if r["req_per_s"] and ref["p50_ms"]:
            ratios.append({"config": r["config"], "vs": base, "mode": r["mode"], "clients": r["clients"],
                           "req_per_s_ratio": round(r["req_per_s"] / ref["req_per_s"], 2),
                           "p50_ratio": round(r["p50_ms"] / ref["p50_ms"], 2)})
    for x in ratios:
        print(f"{x['config']} / {x['vs']}, {x['mode']} x{x['clients']}: req/s x{x['req_per_s_ratio']}, "
              f"p50 x{x['p50_ratio']}")
    out = {
        "benchmark": "bench_serve",
        "command": "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv)),
        "store": {"path": args.store, "items": len(ids), "model": store.meta["model"]["spec"],
                  "layers": store.meta.get("layers"), "pooling": store.meta.get("pooling"),
                  "post": store.meta.get("post"), "size": store.meta.get("size")},
        "upload_bytes_mean": round(sum(len(d) for _, d in files) / len(files)),
        "settings": {k: v for k, v in vars(args).items() if k != "store"},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_start": load_start, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                    "cpu": _cpu_model()},
        "runs": runs,
        "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["errors"] == 0 for r in runs) else 1


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    m = re.search(r"model name\s*:\s*(.+)", text)
    return m.group(1).strip() if m else platform.processor()


if __name__ == "__main__":
    sys.exit(main())
