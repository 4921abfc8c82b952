"""Soak test of resumable extraction: interrupted again and again, the store comes out the same.

    nice python scripts/soak_extract.py --images 20000 --interrupts 6      # the full run (minutes)
    python scripts/soak_extract.py --images 300 --interrupts 2 --real 20   # the quick one (tests/test_soak.py)

It writes a corpus of small generated images (64 x 64 JPEG and PNG), adds real photos
from ../shared/data (flowers17, ukbench56; linked, not copied) and a few percent of
broken files (truncated, garbage, empty, text named .jpg, PNG with a bad CRC), then

1. extracts it once, uninterrupted (the reference);
2. extracts it again into a second store, interrupting the run ``--interrupts`` times at
   random points (after a random number of committed shards plus a random delay, so
   mostly in the middle of a shard), cycling SIGKILL, SIGINT and SIGTERM, and running
   the same command again after each;
3. compares the two stores: every shard array byte for byte, the items table, the
   plan, failures.csv and meta.json (its timestamps and run report aside), and checks
   that every broken file is listed as failed with a reason and nothing else is.

It prints a JSON summary (also written to WORKDIR/soak.json) and exits 0 only if the
stores are identical and every broken file is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DEEPFEAT_SHARED_DATA", REPO.parent / "shared" / "data"))
SIGNALS = (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)
#: meta keys that record when and how fast a run went, not what the store holds
VOLATILE_META = ("created", "updated", "last_run", "meta_sha256")  # the digest covers the times too


def make_corpus(folder: Path, n: int, real: int | None, broken_fraction: float, seed: int) -> tuple[list[str], set]:
    """Write the corpus; returns (all names in it, names of the broken ones)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    real_files = sorted(str(p) for d in ("flowers17", "ukbench56") for p in (SHARED_DATA / d).rglob("*.jpg"))
    if real is not None:
        real_files = real_files[:real]
    n_broken = max(1, round(n * broken_fraction))
    n_gen = max(0, n - len(real_files) - n_broken)
    kinds = ["gen"] * n_gen + ["real"] * len(real_files) + ["broken"] * n_broken
    order = rng.permutation(len(kinds))  # real and broken files mixed in at random places
    names, broken = [], set()
    real_iter = iter(real_files)
    template = None
    for k, idx in enumerate(order):
        kind = kinds[idx]
        sub = folder / f"{k // 1000:03d}"
        sub.mkdir(exist_ok=True)
        if kind == "real":
            src = next(real_iter)
            name = f"{sub.name}/{k:06d}_real_{Path(src).stem}.jpg"
            os.symlink(src, folder / name)
        elif kind == "gen":
            # smooth random colour fields plus a bright box: cheap, varied, and real JPEG/PNG files
            low = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize((64, 64), Image.Resampling.BICUBIC)
            x, y = rng.integers(0, 48, 2)
            img.paste(tuple(int(v) for v in rng.integers(0, 256, 3)), (int(x), int(y), int(x) + 16, int(y) + 16))
            ext = "png" if k % 7 == 0 else "jpg"
            name = f"{sub.name}/{k:06d}_gen.{ext}"
            img.save(folder / name, **({"quality": 85} if ext == "jpg" else {}))
            if template is None and ext == "jpg":
                template = (folder / name).read_bytes()
        else:
            how = ["truncated", "garbage", "empty", "text", "badcrc"][k % 5]
            ext = "png" if how == "badcrc" else "jpg"
            name = f"{sub.name}/{k:06d}_broken_{how}.{ext}"
            p = folder / name
            if how == "truncated":
                b = _jpeg(rng)
                p.write_bytes(b[: len(b) // 3])
            elif how == "garbage":
                p.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
            elif how == "empty":
                p.write_bytes(b"")
            elif how == "text":
                p.write_text("not an image\n")
            else:
                import io

                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
                b = bytearray(buf.getvalue())
                b[29] ^= 0xFF  # the IHDR chunk's CRC
                p.write_bytes(bytes(b))
            broken.add(name)
        names.append(name)
    return names, broken


def _jpeg(rng) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def extract_cmd(store: str, args) -> list[str]:
    return [sys.executable, "-m", "deepfeat.cli", "extract", "corpus", "-o", store, "--size", "warp:64x64",
            "--pool", "gem", "--shard-size", str(args.shard_size), "--workers", str(args.workers),
            "--progress", "none"]


def committed(store: Path) -> int:
    d = store / "shards"
    return len(list(d.glob("*.items.parquet"))) if d.is_dir() else 0


def run_interrupted(workdir: Path, args, n_shards: int, rng: random.Random) -> list[dict]:
    """Extract into WORKDIR/run, interrupting it args.interrupts times, then to the end."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    store = workdir / "run"
    # where to stop: after a random number of committed shards (increasing) plus a random delay
    targets = sorted(rng.sample(range(1, max(2, n_shards)), min(args.interrupts, max(1, n_shards - 1))))
    log = []
    for i, target in enumerate(targets):
        sig = SIGNALS[i % len(SIGNALS)]
        before = committed(store)
        proc = subprocess.Popen(extract_cmd("run", args), cwd=workdir, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        t0 = time.time()
        while proc.poll() is None and committed(store) < target:
            time.sleep(0.02)
        delay = rng.uniform(0, args.max_delay)
        time.sleep(delay)
        at = committed(store)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=600)
        after = committed(store)
        entry = {"signal": signal.Signals(sig).name, "shards_before": before, "shards_at_signal": at,
                 "shards_after": after, "returncode": proc.returncode, "seconds": round(time.time() - t0, 1),
                 "interrupted": not finished and proc.returncode != 0}
        if sig != signal.SIGKILL and entry["interrupted"]:
            lines = err.decode(errors="replace").strip().splitlines()
            entry["message"] = lines[-1] if lines else ""
        entry["kept_committed_shards"] = after >= at
        log.append(entry)
        print(f"run {i + 1}: {entry}", file=sys.stderr, flush=True)
    t0 = time.time()
    res = subprocess.run(extract_cmd("run", args), cwd=workdir, env=env, capture_output=True, text=True)
    log.append({"final": True, "returncode": res.returncode, "seconds": round(time.time() - t0, 1),
                "summary": res.stdout.strip().splitlines()[0] if res.stdout.strip() else res.stderr[-500:]})
    return log


def compare(ref: Path, run: Path) -> dict:
    """The two stores, file by file: {what: equal?} and the list of differences."""
    import pyarrow.parquet as pq

    diffs = []
    ref_files = sorted(p.name for p in (ref / "shards").iterdir())
    run_files = sorted(p.name for p in (run / "shards").iterdir())
    if ref_files != run_files:
        diffs.append(f"shard files differ: {sorted(set(ref_files) ^ set(run_files))[:10]}")
    n_arrays = 0
    for name in ref_files:
        if name.endswith(".npy") and name in run_files:
            n_arrays += 1
            if (ref / "shards" / name).read_bytes() != (run / "shards" / name).read_bytes():
                diffs.append(f"shards/{name} differs")
    for table in ("items.parquet", "plan.parquet"):
        if pq.read_table(ref / table).to_pylist() != pq.read_table(run / table).to_pylist():
            diffs.append(f"{table} rows differ")
    if (ref / "failures.csv").read_bytes() != (run / "failures.csv").read_bytes():
        diffs.append("failures.csv differs")
    ma, mb = (json.loads((s / "meta.json").read_text()) for s in (ref, run))
    for k in VOLATILE_META:
        ma.pop(k, None)
        mb.pop(k, None)
    if ma != mb:
        diffs.append(f"meta.json differs in {sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))}")
    return {"arrays_compared": n_arrays, "differences": diffs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000, help="corpus size, real and broken files included")
    ap.add_argument("--real", type=int, default=None, metavar="N",
                    help="at most N real photos from ../shared/data (default: all found)")
    ap.add_argument("--broken", type=float, default=0.03, metavar="FRACTION", help="broken files (default 0.03)")
    ap.add_argument("--interrupts", type=int, default=6)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-delay", type=float, default=1.5, help="random extra seconds before each signal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="soak-out", help="a new folder (default soak-out)")
    args = ap.parse_args(argv)

    workdir = Path(args.workdir)
    if workdir.exists():
        ap.error(f"{workdir} exists; give a new --workdir")
    t0 = time.time()
    names, broken = make_corpus(workdir / "corpus", args.images, args.real, args.broken, args.seed)
    n_real = sum("_real_" in n for n in names)
    print(f"corpus: {len(names)} files ({n_real} real, {len(broken)} broken) in {time.time() - t0:.0f}s",
          file=sys.stderr, flush=True)

    t0 = time.time()
    res = subprocess.run(extract_cmd("ref", args), cwd=workdir, capture_output=True, text=True)
    ref_seconds = time.time() - t0
    if res.returncode != 0:
        print(res.stderr, file=sys.stderr)
        return 1
    print(f"reference: {res.stdout.strip().splitlines()[0]}", file=sys.stderr, flush=True)
    n_shards = committed(workdir / "ref")

    t0 = time.time()
    log = run_interrupted(workdir, args, n_shards, random.Random(args.seed))
    run_seconds = time.time() - t0

    cmp = compare(workdir / "ref", workdir / "run")
    import pyarrow.parquet as pq

    items = pq.read_table(workdir / "run" / "items.parquet").to_pylist()
    failed = {r["path"].removeprefix("corpus/"): r["error"] for r in items if r["status"] == "error"}
    unreported = sorted(broken - set(failed))
    unexpected = sorted(set(failed) - broken)
    summary = {
        "command": " ".join(["python", "scripts/soak_extract.py"] + (argv if argv is not None else sys.argv[1:])),
        "images": len(names), "real": n_real, "broken": len(broken), "shards": n_shards,
        "items": len(items), "reported_failed": len(failed),
        "interrupts": [e for e in log if not e.get("final")],
        "effective_interrupts": sum(bool(e.get("interrupted")) for e in log),
        "final_run": log[-1], "reference_seconds": round(ref_seconds, 1),
        "interrupted_total_seconds": round(run_seconds, 1), **cmp,
        "broken_not_reported": unreported[:20], "reported_but_not_broken": {k: failed[k] for k in unexpected[:20]},
        "every_broken_file_has_a_reason": all(failed.get(b) for b in broken),
        "failure_reasons": sorted({e.split(":")[0] for e in failed.values()}),
    }
    summary["identical"] = not cmp["differences"] and len(items) == len(names)
    summary["ok"] = (summary["identical"] and not unreported and not unexpected
                     and summary["every_broken_file_has_a_reason"] and log[-1]["returncode"] == 0
                     and all(e.get("kept_committed_shards", True) for e in log))
    text = json.dumps(summary, indent=2)
    (workdir / "soak.json").write_text(text + "\n")
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
