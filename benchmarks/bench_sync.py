"""What a sync costs: ``extract --sync`` after 10% of a folder changed and 5% was deleted, against
extracting only the changed files into a fresh store; and what recording the files costs.

    python benchmarks/bench_sync.py
    python benchmarks/bench_sync.py --data ../shared/data/flowers17 --changed 0.10 --deleted 0.05 --repeat 2

A copy of the folder (Flowers 17: 1360 real photos) is extracted once. Then a tenth of its files
change (half edited: mirrored and saved again; half replaced by another photo of the set) and a
twentieth are deleted. In one run, alternating, best of ``--repeat``, both through the CLI in a
fresh process (start-up included, as a user pays it):

* sync: ``deepfeat extract FOLDER -o STORE --sync`` on a copy of the store (scan, hash of the
  files whose stat differs, tombstones, extraction of the changed files);
* changed only: ``deepfeat extract CHANGED_FILES... -o FRESH``, the same files into a new store.

The goal is a ratio within 1.2x. Separately, the file records' cost: for every photo, the sha256
of its bytes against decoding them (:func:`deepfeat.data.images.decode_image` at the model's
size, draft decoding as extract does), in ms per image, and the scan alone (``sync --dry-run``).
Writes JSON and prints the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]


def _cli(*argv: str, cwd: Path) -> tuple[float, dict]:
    """Wall seconds of ``deepfeat ARGV --json`` in a fresh process, and its JSON report."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "deepfeat", *argv, "--json"], cwd=cwd, env=env, capture_output=True,
                         text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"deepfeat {' '.join(argv)} failed:\n{res.stderr}")
    return dt, json.loads(res.stdout)


def _hash_vs_decode(files: list[Path]) -> dict[str, float]:
    from deepfeat.data.images import decode_image
    from deepfeat.data.preprocess import parse_size_policy
    from deepfeat.models import load_model

    cfg = load_model("efficientnet_lite0", device="cpu").data_config
    policy = parse_size_policy("model")
    t_hash = t_dec = 0.0
    for f in files:
        data = f.read_bytes()
        t0 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t1 = time.perf_counter()
        decode_image(io.BytesIO(data), policy, cfg, draft=True)
        t2 = time.perf_counter()
        t_hash += t1 - t0
        t_dec += t2 - t1
    n = len(files)
    return {"hash_ms_per_image": round(1000 * t_hash / n, 3), "decode_ms_per_image": round(1000 * t_dec / n, 3),
            "hash_share_of_decode": round(t_hash / t_dec, 4)}


def _change(root: Path, rel: list[str], changed: float, deleted: float, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    picked = rng.sample(rel, int(round(len(rel) * (changed + deleted))))
    n_changed = int(round(len(rel) * changed))
    ch, gone = sorted(picked[:n_changed]), sorted(picked[n_changed:])
    others = [p for p in rel if p not in set(picked)]
    for k, p in enumerate(ch):
        if k % 2 == 0:  # edited: mirrored and saved again
            ImageOps.mirror(Image.open(root / p).convert("RGB")).save(root / p, quality=90)
        else:  # replaced by another real photo of the set
            shutil.copy(root / rng.choice(others), root / p)
    for p in gone:
        (root / p).unlink()
    return ch, gone


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flowers17"))
    ap.add_argument("--changed", type=float, default=0.10)
    ap.add_argument("--deleted", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flags", default="--progress none", help="extra extract flags for both runs")
    ap.add_argument("--out", default="bench-out/sync.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))

    base = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    flags = args.flags.split()
    try:
        shutil.copytree(args.data, base / "photos")
        rel = sorted(str(p.relative_to(base)) for p in (base / "photos").rglob("*.jpg"))
        hashing = _hash_vs_decode([base / p for p in rel])
        t_full, _ = _cli("extract", "photos", "-o", "store", *flags, cwd=base)
        ch, gone = _change(base, rel, args.changed, args.deleted, args.seed)
        t_scan, dry = _cli("sync", "store", "--dry-run", cwd=base)
        sync_s, fresh_s, sync_in, fresh_in, phases = [], [], [], [], []
        for r in range(args.repeat):
            shutil.rmtree(base / "synced", ignore_errors=True)
            shutil.rmtree(base / "fresh", ignore_errors=True)
            shutil.copytree(base / "store", base / "synced")
            runs = [("sync", ("extract", "photos", "-o", "synced", "--sync", *flags)),
                    ("fresh", ("extract", *ch, "-o", "fresh", *flags))]
            for what, argv in (runs if r % 2 == 0 else runs[::-1]):  # alternate which goes first
                wall, rep = _cli(*argv, cwd=base)
                (sync_s if what == "sync" else fresh_s).append(wall)
                (sync_in if what == "sync" else fresh_in).append(rep["seconds"])
                if what == "sync":
                    phases.append(rep["sync"]["seconds"])
        from deepfeat.store import FeatureStore

        synced, fresh = FeatureStore(base / "synced"), FeatureStore(base / "fresh")
        assert len(synced) == len(rel) - len(gone), (len(synced), len(rel), len(gone))
        assert len(fresh) == len(ch)
        result = {
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "files": len(rel), "changed": len(ch), "deleted": len(gone), "flags": flags,
            "full_extract_s": round(t_full, 2), "dry_run_wall_s": round(t_scan, 2), "dry_run_scan_s": dry["seconds"],
            "sync_s": [round(s, 2) for s in sync_s], "changed_only_s": [round(s, 2) for s in fresh_s],
            "sync_in_process_s": [round(s, 2) for s in sync_in], "changed_only_in_process_s": [round(s, 2) for s in
                                                                                                fresh_in],
            "sync_phases_s": phases,
            "ratio_sync_over_changed_only": round(min(sync_s) / min(fresh_s), 3),
            "ratio_in_process": round(min(sync_in) / min(fresh_in), 3),
            "file_records": hashing,
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print(f"sync {min(sync_s):.1f}s vs changed files only {min(fresh_s):.1f}s: "
          f"{result['ratio_sync_over_changed_only']:.2f}x (goal <= 1.2x); in the process (start-up aside): "
          f"{min(sync_in):.1f}s vs {min(fresh_in):.1f}s, {result['ratio_in_process']:.2f}x")
    print(f"file records: sha256 {hashing['hash_ms_per_image']} ms/image vs decode "
          f"{hashing['decode_ms_per_image']} ms/image ({100 * hashing['hash_share_of_decode']:.1f}% of decoding)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
