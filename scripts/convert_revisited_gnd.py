#!/usr/bin/env python3
"""Convert the official revisited Oxford/Paris ground truth from pickle to deepfeat's JSON.

Radenovic et al. (CVPR 2018) distribute ROxford / RParis ground truth as
``gnd_roxford5k.pkl`` and ``gnd_rparis6k.pkl``. deepfeat never loads pickles, so run
this once on the official file and pass the JSON it writes to
``deepfeat eval --gt revisited:gnd_roxford5k.json``::

    python scripts/convert_revisited_gnd.py gnd_roxford5k.pkl            # -> gnd_roxford5k.json
    python scripts/convert_revisited_gnd.py gnd_rparis6k.pkl -o rparis.json

The pickle is read with an unpickler that accepts only plain containers and numpy
arrays, so a file that tries to run code is refused; still, only convert files you
downloaded from the authors. The JSON schema is described in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pickle
import sys
from pathlib import Path
from typing import Any

FORMAT = "deepfeat-revisited-gnd"  # deepfeat.evaluate.REVISITED_FORMAT

# The only globals an ndarray pickle needs (numpy 1.x and 2.x module names); protocol 2
# pickles store an array's bytes as codecs.encode(text, "latin1").
_NUMPY_GLOBALS = {
    ("_codecs", "encode"), ("builtins", "bytes"), ("__builtin__", "bytes"), ("builtins", "bytearray"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class ConversionError(Exception):
    """The input is not a revisited ground-truth pickle this script understands."""


class _GndUnpickler(pickle.Unpickler):
    """Builds lists, dicts, strings, numbers and numpy arrays; refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise ConversionError(f"the pickle asks for {module}.{name}, which a revisited ground-truth file "
                                  f"does not contain; refusing to load it (is it the official gnd_*.pkl?)")
        if module in ("numpy", "_codecs", "builtins", "__builtin__"):
            return getattr(importlib.import_module("builtins" if module == "__builtin__" else module), name)
        submodule = module.rsplit(".", 1)[1]
        for package in ("numpy._core", "numpy.core"):  # numpy 2 renamed numpy.core to numpy._core
            try:
                return getattr(importlib.import_module(f"{package}.{submodule}"), name)
            except (ImportError, AttributeError):
                continue
        raise ConversionError(f"this numpy cannot rebuild {module}.{name}")


def load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            return _GndUnpickler(f, encoding="latin1").load()  # latin1: Python 2 pickles of numpy arrays
        except ConversionError:
            raise
        except Exception as e:  # noqa: BLE001 -- a truncated or foreign file fails in many ways
            raise ConversionError(f"cannot read {path} as a pickle: {type(e).__name__}: {e}") from None


def _plain(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else v


def _index_list(v: Any, where: str, n: int) -> list[int]:
    v = _plain(v)
    if isinstance(v, (list, tuple)) and all(isinstance(_plain(i), int) and not isinstance(i, bool) for i in v):
        out = [int(_plain(i)) for i in v]
        bad = [i for i in out if not 0 <= i < n]
        if bad:
            raise ConversionError(f"{where} has indices outside imlist (0..{n - 1}): {bad[:3]}")
        return out
    raise ConversionError(f"{where} is not a list of integer indices (got {type(v).__name__})")


def to_json_gnd(obj: Any, source: str = "") -> dict[str, Any]:
    """The pickle's ``{'imlist', 'qimlist', 'gnd'}`` as deepfeat's JSON document."""
    if not isinstance(obj, dict) or not {"imlist", "qimlist", "gnd"} <= set(obj):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ConversionError(f"expected a dict with 'imlist', 'qimlist' and 'gnd', got {keys}")
    imlist = [str(_plain(s)) for s in _plain(obj["imlist"])]
    qimlist = [str(_plain(s)) for s in _plain(obj["qimlist"])]
    gnd_in = _plain(obj["gnd"])
    if len(gnd_in) != len(qimlist):
        raise ConversionError(f"'gnd' has {len(gnd_in)} entries for {len(qimlist)} query images")
    gnd = []
    for qi, g in enumerate(gnd_in):
        if not isinstance(g, dict):
            raise ConversionError(f"gnd[{qi}] is not a dict")
        entry: dict[str, Any] = {}
        bbx = _plain(g.get("bbx"))
        if bbx is not None:
            if not isinstance(bbx, (list, tuple)) or len(bbx) != 4:
                raise ConversionError(f"gnd[{qi}]['bbx'] is not [x1, y1, x2, y2]: {bbx!r}")
            bbx = [float(_plain(v)) for v in bbx]
        entry["bbx"] = bbx
        for key in ("easy", "hard", "junk"):
            if key not in g:
                raise ConversionError(f"gnd[{qi}] has no {key!r} list")
            entry[key] = _index_list(g[key], f"gnd[{qi}][{key!r}]", len(imlist))
        gnd.append(entry)
    return {"format": FORMAT, "version": 1, "source": source, "imlist": imlist, "qimlist": qimlist, "gnd": gnd}


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
        doc = to_json_gnd(load_pickle(args.pkl), source=args.pkl.name)
    except ConversionError as e:
        print(f"convert_revisited_gnd: error: {args.pkl}: {e}", file=sys.stderr)
        return 1
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(doc['qimlist'])} queries, {len(doc['imlist'])} database images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
