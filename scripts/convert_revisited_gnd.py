#!/usr/bin/env python3
"""Convert the official revisited Oxford/Paris ground truth from pickle to deepfeat's JSON.

Radenovic et al. (CVPR 2018) distribute ROxford / RParis ground truth as
``gnd_roxford5k.pkl`` and ``gnd_rparis6k.pkl``. JSON is faster to read and needs no unpickler: run
this once on the official file and pass the JSON it writes to
``deepfeat eval --gt revisited:gnd_roxford5k.json`` (``--gt revisited:gnd_roxford5k.pkl``
reads the pickle directly, with the same restricted unpickler)::

    python scripts/convert_revisited_gnd.py gnd_roxford5k.pkl            # -> gnd_roxford5k.json
    python scripts/convert_revisited_gnd.py gnd_rparis6k.pkl -o rparis.json

The pickle is read with deepfeat.evaluate.gnd_pickle's unpickler, which accepts only plain
containers and numpy arrays, so a file that tries to run code is refused; still, only
convert files you downloaded from the authors. The JSON schema is described in
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepfeat.errors import DeepfeatError
from deepfeat.evaluate.gnd_pickle import load_restricted_pickle, revisited_doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Convert gnd_roxford5k.pkl / gnd_rparis6k.pkl to deepfeat's JSON.")
    ap.add_argument("pkl", type=Path, help="the official revisited ground-truth pickle")
    ap.add_argument("-o", "--output", type=Path, help="JSON file to write (default: PKL with .json)")
    args = ap.parse_args(argv)
    out = args.output or args.pkl.with_suffix(".json")
    if not args.pkl.is_file():
        print(f"convert_revisited_gnd: error: file not found: {args.pkl}", file=sys.stderr)
        return 2
    print(f"convert_revisited_gnd: warning: reading the pickle {args.pkl}. Pickles can carry code; this script "
          f"accepts only lists, dicts and numpy arrays, but convert only the official files from the "
          f"revisitop authors.", file=sys.stderr)
    try:
        doc = revisited_doc(load_restricted_pickle(args.pkl), source=args.pkl.name)
    except DeepfeatError as e:
        print(f"convert_revisited_gnd: error: {args.pkl}: {e}", file=sys.stderr)
        return 1
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(doc['qimlist'])} queries, {len(doc['imlist'])} database images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
