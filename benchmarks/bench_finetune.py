"""Fine-tuning gain: retrieval on the held-out split before and after, side by side.

Runs ``deepfeat finetune DATA -o RUN --eval-retrieval`` (through the command's own
argument parser, so the options are exactly the CLI's) with the settings recorded in
``docs/results.md``, prints the before/after table and writes a JSON report.

    python benchmarks/bench_finetune.py                         # ../shared/data/flowers17
    python benchmarks/bench_finetune.py --data DIR -o RUN -- --epochs 4 --lr 0.003

Everything after ``--`` replaces the recorded finetune options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "flowers17"

#: the options of the run recorded in docs/results.md
RECORDED = ["--image-size", "224", "--val-frac", "0.4", "--seed", "0", "--head-epochs", "10", "--epochs", "6",
            "--train-blocks", "3", "--head-stage-lr", "0.001", "--lr", "0.01", "--batch-size", "16", "--eval-retrieval",
            "--progress", "lines"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = None
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA), help=f"labelled data (default {DATA})")
    ap.add_argument("-o", "--output", default="/tmp/deepfeat-bench-finetune", help="run directory (must not exist)")
    ap.add_argument("--json", default=None, help="report path (default RUN/bench.json)")
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir() and not Path(args.data).is_file():
        print(f"data not found: {args.data} (the shared data sets live in ../shared/data)", file=sys.stderr)
        return 2

    from deepfeat.cli import cmd_finetune

    parser = argparse.ArgumentParser(prog="deepfeat")
    cmd_finetune.register(parser.add_subparsers(dest="command"))
    ft_argv = ["finetune", args.data, "-o", args.output, *(RECORDED if extra is None else extra)]
    ns = parser.parse_args(ft_argv)
    command = "deepfeat " + " ".join(ft_argv)
    print(command, flush=True)
    t0 = time.perf_counter()
    rc = cmd_finetune.run(ns)
    seconds = time.perf_counter() - t0
    if rc != 0:
        return rc
    run = Path(args.output)
    meta = json.loads((run / "meta.json").read_text())
    retrieval = json.loads((run / "retrieval.json").read_text()) if (run / "retrieval.json").is_file() else None
    import torch

    report = {
        "command": command,
        "seconds": round(seconds, 1),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__,
                    "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "val_accuracy": meta["val_accuracy"],
        "best_val_accuracy": meta["best_val_accuracy"],
        "data": meta["data"],
        "retrieval": retrieval,
        "history": json.loads((run / "log.json").read_text()),
    }
    out = Path(args.json) if args.json else run / "bench.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwall time {seconds:.0f}s; report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
