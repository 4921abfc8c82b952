"""Start-up: one photo through ``deepfeat extract``, ``deepfeat search STORE photo.jpg`` and
``deepfeat classify``, with the graph cache cold (empty) and warm (filled by the run before), side by
side in one run.

Each round runs, in fresh processes: the import floor (``python -c "import torch, timm"``), then each
command cold (a new, empty ``$DEEPFEAT_CACHE``) and warm (the cache a cold run filled): ``extract``
cold then warm; ``search STORE query.jpg`` (a copy of the photo outside the store, so it is embedded)
with an empty cache and with the cache the cold extract filled, alternating which goes first from
round to round; ``classify`` cold (it exports the classifier) then warm. Prints the median
wall-clock seconds per command and state and the warm / cold ratio; writes JSON.

    python benchmarks/bench_startup.py --photo ../shared/data/ukbench56/ukbench00000.jpg --repeat 3

--compare-src DIR: also run every command, in the same rounds, with the deepfeat sources of DIR on
PYTHONPATH (e.g. a `git archive` of an earlier commit's src/), labelled "before"; the ratios
before / now of each command are printed too.
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


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photo", required=True, help="one image file")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--extract-args", default="", help="extra arguments for extract, e.g. '--size long:512'")
    ap.add_argument("--compare-src", help="a src/ folder of an earlier deepfeat, run side by side as 'before'")
    ap.add_argument("--out", default="bench-out/startup.json")
    args = ap.parse_args()

    py = [sys.executable]
    work = Path(tempfile.mkdtemp(prefix="deepfeat-startup-"))
    folder = work / "one"
    folder.mkdir()
    photo = folder / Path(args.photo).name
    shutil.copy(args.photo, photo)
    query = work / f"query-{Path(args.photo).name}"  # outside the store: search embeds it
    shutil.copy(args.photo, query)
    base_env = {k: v for k, v in os.environ.items() if k != "DEEPFEAT_CACHE"}
    times: dict[str, list[float]] = {}

    def add(name: str, dt: float) -> None:
        times.setdefault(name, []).append(dt)
        print(f"  {name:<22} {dt:6.2f}s", flush=True)

    def one_round(r: int, label: str, base_env: dict[str, str]) -> None:
        cache = work / f"cache{r}{label.strip()}"
        states = ["cold", "warm"]
        for state in states:  # warm needs cold first: cold fills the cache warm reads
            env = {**base_env, "DEEPFEAT_CACHE": str(cache)}
            store = work / f"store-{r}-{label.strip()}{state}"
            add(f"{label}extract {state}", timed(py + ["-m", "deepfeat", "extract", str(folder), "-o", str(store),
                                                      "--progress", "none", *args.extract_args.split()], env))
        # search (a photo not in the store, so it is embedded): warm = the cache the cold extract filled
        # (its prepared network embeds the query without torch), cold = an empty cache; alternated
        for state in (states if r % 2 == 0 else states[::-1]):
            env = {**base_env, "DEEPFEAT_CACHE": str(cache if state == "warm" else work / f"empty{r}{label.strip()}")}
            add(f"{label}search {state}", timed(py + ["-m", "deepfeat", "search",
                                                     str(work / f"store-{r}-{label.strip()}cold"), str(query)], env))
        # classify: cold = an empty cache (the run exports the classifier), warm = the cache it filled
        for state in states:
            env = {**base_env, "DEEPFEAT_CACHE": str(work / f"classify{r}{label.strip()}")}
            add(f"{label}classify {state}", timed(py + ["-m", "deepfeat", "classify", str(photo)], env))

    try:
        trees = [("", None)] + ([("before ", os.path.abspath(args.compare_src))] if args.compare_src else [])
        for r in range(args.repeat):
            print(f"round {r + 1}/{args.repeat}", flush=True)
            add("import torch+timm", timed(py + ["-c", "import torch, timm"], base_env))
            for label, src in (trees if r % 2 == 0 else trees[::-1]):
                tree_env = dict(base_env) if src is None else {**base_env, "PYTHONPATH": src}
                one_round(r, label, tree_env)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nmedian of {args.repeat} rounds (load average now {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores)")
    print(f"{'command':<17} {'cold s':>8} {'warm s':>8} {'warm/cold':>10}")
    for label in ("", "before ") if args.compare_src else ("",):
        for cmd in ("extract", "search", "classify"):
            c, w = med[f"{label}{cmd} cold"], med[f"{label}{cmd} warm"]
            print(f"{label + cmd:<17} {c:8.2f} {w:8.2f} {w / c:10.2f}")
    if args.compare_src:
        for key in [k for k in med if not k.startswith("before ") and f"before {k}" in med]:
            print(f"now / before, {key}: {med[key] / med['before ' + key]:.2f}")
    print(f"import torch+timm alone: {med['import torch+timm']:.2f}s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"times": times, "median": med, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
