"""Load test of `deepfeat serve`: 1 to 64 concurrent clients mixing uploads and id queries, on loopback.

    python benchmarks/load_serve.py /tmp/ukb-store --root /work/shared/data/ukbench56
    python benchmarks/load_serve.py STORE --levels 1,4,16,64 --requests 200 --duration 20 --upload-share 0.5

One real server process (``python -m deepfeat.serve``, always on 127.0.0.1: this script
never passes ``--host``) is driven by 1, 2, 4, ... 64 client threads in turn, each with its
own keep-alive ``httpx`` connection. Every client draws its next request at random:
an upload of one of the store's own images (``POST /api/search/upload``: receive, decode,
embed, search) with probability ``--upload-share``, else a search by a random stored id
(``GET /api/search/item/{id}``: FAISS only). Each level is bounded by ``--requests`` and
``--duration``, whichever comes first. Recorded per level: completed requests, req/s,
p50/p99 latency of each kind and of all, errors by status code (an overload answer is a
JSON 503 with ``Retry-After``: counted, with the share that were JSON), and the server's
resident memory (VmRSS) after the level. Pass server options after ``--server-args``
(e.g. ``--server-args --limit-concurrency 16`` to watch the JSON 503s). Writes JSON and
prints a table. Reuses bench_serve.py's server process and statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import Server, _cpu_model, percentile, store_files  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("store", help="a feature store")
    ap.add_argument("--root", help="base of the store's relative image paths (default: the current directory)")
    ap.add_argument("--levels", default="1,2,4,8,16,32,64", help="client counts, in order (default 1..64)")
    ap.add_argument("--requests", type=int, default=240, help="requests per level at most (default 240)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per level at most (default 30)")
    ap.add_argument("--upload-share", type=float, default=0.5, help="share of uploads among requests (default 0.5)")
    ap.add_argument("--images", type=int, default=32, help="distinct store images uploaded in turn (default 32)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/load_serve.json", help="JSON results (default bench-out/load_serve.json)")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                    help="the rest of the command line goes to `deepfeat serve`")
    args = ap.parse_args(argv)
    args.level_list = [int(x) for x in args.levels.split(",") if x.strip()]
    if not args.level_list or min(args.level_list) < 1 or max(args.level_list) > 64:
        ap.error("--levels: client counts between 1 and 64")
    if not 0 <= args.upload_share <= 1:
        ap.error("--upload-share: between 0 and 1")
    if args.requests < 1 or args.duration <= 0:
        ap.error("--requests and --duration must be positive")
    if "--host" in args.server_args:
        ap.error("this load test runs on loopback only: no --host")
    return args


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def run_level(url: str, clients: int, args, ids: list[int], files: list[tuple[str, bytes]]) -> dict:
    import httpx

    lock = threading.Lock()
    issued = [0]
    lat: dict[str, list[float]] = {"upload": [], "id": []}
    errors: dict[str, int] = {}
    json_503 = [0]
    samples: list[str] = []
    stop_at = time.perf_counter() + args.duration

    def worker(seed: int) -> None:
        rng = random.Random(args.seed * 1000 + seed)
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    if issued[0] >= args.requests or time.perf_counter() > stop_at:
                        return
                    issued[0] += 1
                kind = "upload" if rng.random() < args.upload_share else "id"
                t = time.perf_counter()
                try:
                    if kind == "upload":
                        name, data = files[rng.randrange(len(files))]
                        r = c.post("/api/search/upload", params={"k": args.k},
                                   files={"file": (name, data, "image/jpeg")})
                    else:
                        r = c.get(f"/api/search/item/{ids[rng.randrange(len(ids))]}", params={"k": args.k})
                    status = str(r.status_code)
                    is_json = r.headers.get("content-type", "").startswith("application/json")
                    retry = r.headers.get("retry-after")
                    text = r.text[:120]
                except httpx.HTTPError as e:
                    status, is_json, retry, text = type(e).__name__, False, None, str(e)[:120]
                dt = time.perf_counter() - t
                with lock:
                    if status == "200":
                        lat[kind].append(dt)
                    else:
                        errors[status] = errors.get(status, 0) + 1
                        if status == "503" and is_json and retry:
                            json_503[0] += 1
                        if len(samples) < 3:
                            samples.append(f"{kind} {status} {text}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    both = lat["upload"] + lat["id"]

    def ms(xs, q):
        return round(percentile(xs, q) * 1000, 1) if xs else None

    return {"clients": clients, "completed": len(both), "uploads": len(lat["upload"]), "ids": len(lat["id"]),
            "seconds": round(wall, 2), "req_per_s": round(len(both) / wall, 2),
            "p50_ms": ms(both, 0.5), "p99_ms": ms(both, 0.99),
            "upload_p50_ms": ms(lat["upload"], 0.5), "upload_p99_ms": ms(lat["upload"], 0.99),
            "id_p50_ms": ms(lat["id"], 0.5), "id_p99_ms": ms(lat["id"], 0.99),
            "errors": sum(errors.values()), "errors_by_status": errors, "json_503_with_retry_after": json_503[0],
            "error_samples": samples}


def main(argv=None) -> int:
    args = parse_args(argv)
    import httpx

    from deepfeat.store import FeatureStore

    store = FeatureStore(args.store)
    ids = [int(i) for i in store.ids]
    files = store_files(store, args.root or os.getcwd(), args.images, args.seed)
    load_start = [round(x, 2) for x in os.getloadavg()]
    srv = Server(args.store, args.root, list(args.server_args))
    assert srv.url.startswith("http://127.0.0.1:"), srv.url  # loopback only
    levels = []
    try:
        with httpx.Client(timeout=30) as probe:
            startup = srv.wait_ready(probe)
            for i in range(4):  # warm-up: the first forward passes are slower
                probe.post(f"{srv.url}/api/search/upload", files={"file": files[i % len(files)]})
            rss0 = rss_mib(srv.proc.pid)
            print(f"store {args.store}: {len(ids)} items; server up in {startup:.1f} s, {rss0} MiB; "
                  f"{args.upload_share:.0%} uploads; at most {args.requests} requests or {args.duration:.0f} s "
                  f"per level; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
            print(f"{'clients':>7s} {'done':>5s} {'req/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'up p50':>8s} "
                  f"{'up p99':>8s} {'id p50':>7s} {'id p99':>7s} {'errors':>6s} {'RSS MiB':>8s}")
            for clients in args.level_list:
                res = run_level(srv.url, clients, args, ids, files)
                health = probe.get(f"{srv.url}/api/health").json()
                res.update(rss_mib=rss_mib(srv.proc.pid), server_status=health["status"],
                           load_avg=round(os.getloadavg()[0], 2))
                levels.append(res)
                err = ",".join(f"{k}:{v}" for k, v in res["errors_by_status"].items()) or "0"
                print(f"{clients:7d} {res['completed']:5d} {res['req_per_s']:7.2f} {res['p50_ms']!s:>8s} "
                      f"{res['p99_ms']!s:>8s} {res['upload_p50_ms']!s:>8s} {res['upload_p99_ms']!s:>8s} "
                      f"{res['id_p50_ms']!s:>7s} {res['id_p99_ms']!s:>7s} {err:>6s} {res['rss_mib']!s:>8s}",
                      flush=True)
            inference = probe.get(f"{srv.url}/api/health").json()["inference"]
    finally:
        srv.stop()
    base = levels[0]["req_per_s"] or None
    for lv in levels:
        lv["req_per_s_vs_first"] = round(lv["req_per_s"] / base, 2) if base else None
    print("req/s against 1 client: " + ", ".join(f"x{lv['clients']}: {lv['req_per_s_vs_first']}" for lv in levels))
    out = {
        "benchmark": "load_serve",
        "command": "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv)),
        "store": {"path": args.store, "items": len(ids), "model": store.meta["model"]["spec"],
                  "feature": store.feature_name(), "post": store.meta.get("post")},
        "settings": {k: v for k, v in vars(args).items() if k not in ("store", "level_list")},
        "server": {"cmd": srv.cmd, "startup_s": round(startup, 1), "rss_mib_after_warmup": rss0,
                   "inference": inference},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "cpu": _cpu_model(), "load_avg_start": load_start,
                    "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "levels": levels,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(lv["errors"] == lv["json_503_with_retry_after"] for lv in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
