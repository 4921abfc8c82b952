"""The revisited ROxford / RParis ground truth (Radenovic et al., CVPR 2018): the
JSON (or the official pickle) read and checked, and its easy / medium / hard protocols."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfeat.errors import FormatError, UsageError, suggest
from deepfeat.evaluate.gnd_pickle import REVISITED_FORMAT
from deepfeat.evaluate.names import _NameIndex
from deepfeat.evaluate.values import GroundTruth, Query

#: Value of the ``format`` field of a revisited ground-truth JSON file.
#: Revisited protocols: (positives, junk) as lists of the gnd keys they are made of.
REVISITED_PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def read_revisited_gnd(json_path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a revisited ground-truth JSON file (see docs/evaluation.md).

    ``{"format": "deepfeat-revisited-gnd", "version": 1, "imlist": [names],
    "qimlist": [names], "gnd": [{"bbx": [x1, y1, x2, y2] | null, "easy": [i],
    "hard": [i], "junk": [i]}, ...]}``, indices 0-based into ``imlist``, one gnd
    entry per query. ``scripts/convert_revisited_gnd.py`` writes it from the official
    ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``; a ``.pkl`` path is read directly, with
    the restricted unpickler of :mod:`deepfeat.evaluate.gnd_pickle` (no code runs; anything but
    numpy arrays, lists, dicts, numbers and strings is refused).
    """
    path = Path(json_path)
    if not path.is_file():
        raise UsageError(f"revisited ground-truth file not found: {path}")
    if path.suffix.lower() == ".pkl":  # the official file, read by an unpickler that runs no code
        from deepfeat.evaluate.gnd_pickle import read_revisited_pickle

        data = read_revisited_pickle(path)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: not valid JSON ({e})") from None

    def bad(msg: str) -> FormatError:
        return FormatError(f"{path}: {msg} (expected the {REVISITED_FORMAT} JSON written by "
                           f"scripts/convert_revisited_gnd.py)")

    if not isinstance(data, dict):
        raise bad("the top level is not an object")
    if data.get("format", REVISITED_FORMAT) != REVISITED_FORMAT:
        raise bad(f"format is {data.get('format')!r}")
    if data.get("version", 1) != 1:
        raise bad(f"unsupported version {data.get('version')!r}; this deepfeat reads version 1")
    for key in ("imlist", "qimlist", "gnd"):
        if not isinstance(data.get(key), list):
            raise bad(f"{key!r} is missing or not a list")
    for key in ("imlist", "qimlist"):
        if not all(isinstance(s, str) and s for s in data[key]):
            raise bad(f"{key!r} must hold image names (non-empty strings)")
    nq, nim = len(data["qimlist"]), len(data["imlist"])
    if len(data["gnd"]) != nq:
        raise bad(f"'gnd' has {len(data['gnd'])} entries for {nq} query images in 'qimlist'")
    for qi, g in enumerate(data["gnd"]):
        if not isinstance(g, dict):
            raise bad(f"gnd[{qi}] is not an object")
        for key in ("easy", "hard", "junk"):
            v = g.get(key)
            if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                raise bad(f"gnd[{qi}][{key!r}] must be a list of integer indices into 'imlist'")
            out = [i for i in v if not 0 <= i < nim]
            if out:
                raise bad(f"gnd[{qi}][{key!r}] has indices outside 'imlist' (0..{nim - 1}): {out[:3]}")
        bbx = g.get("bbx")
        if bbx is not None and (not isinstance(bbx, list) or len(bbx) != 4
                                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbx)):
            raise bad(f"gnd[{qi}]['bbx'] must be [x1, y1, x2, y2] or null")
    return data


def load_revisited_gt(json_path: str | os.PathLike, db_paths: Sequence[str], protocol: str) -> GroundTruth:
    """ROxford / RParis ground truth (Radenovic et al. 2018) for one protocol.

    *protocol* is ``easy`` (relevant easy; junk junk + hard), ``medium`` (easy + hard;
    junk) or ``hard`` (hard; junk + easy). Every ``imlist`` image must be in the
    database; query images (``qimlist``) are not part of the revisited database, so
    when the store holds them (a store of the original 5063 / 6392 images) they are
    removed from every ranking (``excluded``). Extra database images (R1M
    distractors) are kept.
    """
    return _revisited_gts(json_path, db_paths, [protocol])[0]


def _revisited_gts(json_path: str | os.PathLike, db_paths: Sequence[str], protocols: list[str]) -> list[GroundTruth]:
    for protocol in protocols:
        if protocol not in REVISITED_PROTOCOLS:
            raise UsageError(f"unknown revisited protocol {protocol!r}; choose one of "
                             f"{', '.join(REVISITED_PROTOCOLS)}.{suggest(protocol, REVISITED_PROTOCOLS)}")
    data = read_revisited_gnd(json_path)
    index = _NameIndex(db_paths)
    im_idx = index.resolve(data["imlist"], f"'imlist' of {json_path}")
    db_of = [im_idx[n] for n in data["imlist"]]
    if len(set(db_of)) != len(db_of):
        raise UsageError(f"'imlist' of {json_path} names some database items twice; check the store's paths")
    in_imlist = set(db_of)
    located = []
    for qname in data["qimlist"]:
        cands = index.candidates(qname)
        located.append(cands[0] if len(cands) == 1 else None)
    excluded = frozenset(i for i in located if i is not None and i not in in_imlist)
    out = []
    for protocol in protocols:
        pos_keys, junk_keys = REVISITED_PROTOCOLS[protocol]
        queries = tuple(
            Query(name=qname, image=qname, index=qindex, path=None if qindex is None else index.paths[qindex],
                  relevant=frozenset(db_of[i] for key in pos_keys for i in g[key]),
                  junk=frozenset(db_of[i] for key in junk_keys for i in g[key]),
                  bbox=None if g.get("bbx") is None else tuple(float(v) for v in g["bbx"]))
            for qname, qindex, g in zip(data["qimlist"], located, data["gnd"])
        )
        out.append(GroundTruth(f"revisited-{protocol}", queries, len(index.paths), exclude_query=False,
                               excluded=excluded, source=str(json_path)))
    return out
