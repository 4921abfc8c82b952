"""Where does the fine-tuning gain go? Every candidate descriptor of one run, side by side.

For a finished ``deepfeat finetune`` run, describes the run's held-out split (``val.txt``)
with the base model and with ``finetuned:RUN`` in one pass each, and prints, for each
descriptor (last feature map with GeM p = 3 / learned p / average / MAC, the head's
input, the logits, the softmax), the mAP and mP@10 before and after, plus how far each
backbone unit's weights moved (relative L2 change). Writes the report as JSON.

    python benchmarks/bench_finetune_descriptors.py RUN [RUN ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished fine-tuning run directories")
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--json", default=None, help="report path (default RUN/descriptors.json for each run)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    from deepfeat.finetune.descriptors import compare_run

    reports = []
    for run in args.runs:
        t0 = time.perf_counter()
        rep = compare_run(run, args.split, workers=args.workers)
        rep["seconds"] = round(time.perf_counter() - t0, 1)
        reports.append(rep)
        cfg = json.loads((Path(run) / "config.json").read_text())["config"]
        print(f"\n{run}: {rep['n_images']} {args.split} images; train_blocks={cfg['train_blocks']} lr={cfg['lr']} "
              f"head_epochs={cfg['head_epochs']} epochs={cfg['epochs']} loss={cfg['loss']}"
              + (f"; recorded descriptor {rep['recorded']}" if rep.get("recorded") else ""))
        w = max(len(d["name"]) for d in rep["descriptors"])
        print(f"{'descriptor'.ljust(w)}  {'mAP before':>10}  {'mAP after':>9}  {'gain':>6}  {'mP@10 after':>11}")
        for d in rep["descriptors"]:
            b, a = rep["before"].get(d["name"]), rep["after"][d["name"]]
            bm = f"{100 * b['map']:.2f}" if b else "-"
            gain = f"{100 * (a['map'] - b['map']):+.2f}" if b else "-"
            print(f"{d['name'].ljust(w)}  {bm:>10}  {100 * a['map']:>9.2f}  {gain:>6}  "
                  f"{100 * a['mp_at_k']['10']:>11.2f}")
        print("relative weight change ||W-W0||/||W0|| per unit: "
              + ", ".join(f"{u} {c:.4f}" for u, c in rep["weight_change"].items()))
        out = Path(args.json) if args.json and len(args.runs) == 1 else Path(run) / "descriptors.json"
        out.write_text(json.dumps(rep, indent=1) + "\n")
        print(f"report: {out} ({rep['seconds']:.0f}s)")
    if args.json and len(args.runs) > 1:
        Path(args.json).write_text(json.dumps(reports, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
