"""A sync after every file of a collection was touched (same bytes, new modification times): the
first sync reads every file to hash it; the next ones take the hashes from the file-hash cache
(deepfeat.pipeline.hashcache). Side by side in one run, each sync in a fresh process
(``deepfeat sync STORE --dry-run --json``, which scans exactly as a sync does):

* ``first``: the cache does not know the touched files: every one is read;
* ``cached``: the same again: every hash comes from the cache;
* ``--no-cache``: every file read again (what every sync did before the cache).

Prints the seconds, the counts (``hashed`` read, ``hash_cached`` from the cache) and the ratios.
``--evict``: before each sync, the files' pages are dropped from the page cache
(``posix_fadvise(DONTNEED)``), so that reading them costs what it costs on a collection larger than
memory (a photo library of hundreds of GB), not a copy from memory.

    python benchmarks/bench_hash_cache.py --data ../shared/data/flowers17 --repeat 3 [--evict]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def deepfeat(env: dict[str, str], *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deepfeat", *args], env=env, capture_output=True, text=True,
                          check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"deepfeat {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return dt, proc.stdout


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (written pages are flushed first)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a folder of images (copied: the copies are touched)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--evict", action="store_true", help="drop the files' pages from the page cache before each sync")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deepfeat-hashcache-"))
    try:
        photos = work / "photos"
        shutil.copytree(args.data, photos)
        env = {**os.environ, "DEEPFEAT_CACHE": str(work / "cache")}
        store = str(work / "store")
        deepfeat(env, "extract", str(photos), "-o", store, "--progress", "none")
        files = [p for p in photos.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        times: dict[str, list[float]] = {"first": [], "cached": [], "no-cache": []}
        counts: dict[str, tuple[int, int]] = {}
        for r in range(args.repeat):
            (work / "cache" / "hashes.sqlite").unlink(missing_ok=True)
            for f in files:  # every file touched: a new modification time, the same bytes
                st = f.stat()
                os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + (r + 1) * 10**9))
            for name, extra in (("first", ()), ("cached", ()), ("no-cache", ("--no-cache",))):
                if args.evict:
                    evict(files)
                dt, out = deepfeat(env, "sync", store, "--dry-run", "--json", *extra)
                plan = json.loads(out)
                times[name].append(dt)
                counts[name] = (plan["hashed"], plan["hash_cached"])
                print(f"round {r + 1}: {name:<9} {dt:6.2f}s  hashed {plan['hashed']}, from the cache "
                      f"{plan['hash_cached']}", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{len(files)} files, {size / 2**20:.1f} MiB, every one touched"
              f"{', pages dropped before each sync' if args.evict else ''}; median of {args.repeat} "
              f"(load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores)")
        for k, v in med.items():
            print(f"  {k:<9} {v:6.2f}s  (read {counts[k][0]}, from the cache {counts[k][1]})")
        print(f"cached / first {med['cached'] / med['first']:.2f}; cached / --no-cache "
              f"{med['cached'] / med['no-cache']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
