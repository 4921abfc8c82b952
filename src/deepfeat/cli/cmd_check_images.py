"""``deepfeat check-images``: find unreadable, corrupt and odd images before they bite."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from deepfeat.cli.common import print_json
from deepfeat.data.images import check_image, discover, printable_path


def register(sub) -> None:
    p = sub.add_parser("check-images", help="report unreadable, corrupt or odd images",
                       description="Scan images (full decode) and report errors (empty, not an image, truncated, "
                                   "bad CRC, decompression bombs) and oddities (CMYK, 16-bit, palette+alpha, "
                                   "EXIF rotation, grayscale, tiny, wrong extension).")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folders, files, glob patterns or @list.txt")
    p.add_argument("--report", metavar="FILE", help="write the full report (.json or .csv)")
    p.add_argument("--move-bad", metavar="DIR", help="move files with errors into DIR (keeping sub-folders)")
    p.add_argument("--all-files", action="store_true", help="also check files without an image extension")
    p.add_argument("--workers", type=int, default=4, metavar="N")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="only the summary")
    p.set_defaults(func=run)


def _write_report(path: str, results: list) -> None:
    rows = [r.to_dict() for r in results]
    if path.endswith(".csv"):
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["path", "status", "problems"])
            w.writeheader()
            for r in rows:
                w.writerow({**r, "problems": "; ".join(r["problems"])})
    else:
        Path(path).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def _move(results: list, dest: str) -> int:
    bad = [r.path for r in results if r.status == "error"]
    if not bad:
        return 0
    root = os.path.commonpath([os.path.abspath(os.path.dirname(p)) for p in bad])
    moved = 0
    for p in bad:
        target = Path(dest) / os.path.relpath(os.path.abspath(p), root)
        target.parent.mkdir(parents=True, exist_ok=True)
        n = 1
        while target.exists():
            target = target.with_name(f"{target.stem}.{n}{target.suffix}")
            n += 1
        shutil.move(p, target)
        moved += 1
    return moved


def run(args) -> int:
    paths = discover(args.inputs, all_files=args.all_files)
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        results = list(pool.map(check_image, paths))
    counts = Counter(r.status for r in results)
    if args.json:
        print_json({"results": [r.to_dict() for r in results], "summary": dict(counts)})
    elif not args.quiet:
        for r in results:
            if r.status != "ok":
                # one line per file, whatever its name holds (newlines, bytes that are not UTF-8)
                name = printable_path(r.path)
                if not name.isprintable():
                    name = name.encode("unicode_escape").decode("ascii")
                print(f"{r.status.upper():7s} {name}: {'; '.join(r.problems)}")
    if args.report:
        _write_report(args.report, results)
    moved = _move(results, args.move_bad) if args.move_bad else 0
    print(f"{len(results)} files: {counts.get('ok', 0)} ok, {counts.get('warning', 0)} odd but usable, "
          f"{counts.get('error', 0)} unusable" + (f"; moved {moved} to {args.move_bad}" if moved else "")
          + (f"; report: {args.report}" if args.report else ""), file=sys.stderr)
    return 1 if counts.get("error") else 0
