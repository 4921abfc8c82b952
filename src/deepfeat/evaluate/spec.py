"""``--gt`` SPEC -> ground truths: the one place a ground-truth format gets its prefix."""

from __future__ import annotations

from collections.abc import Sequence

from deepfeat.errors import UsageError, suggest
from deepfeat.evaluate.loaders import class_folder_gt, groups_gt, load_oxford_gt, ukbench_gt
from deepfeat.evaluate.revisited import REVISITED_PROTOCOLS, _revisited_gts
from deepfeat.evaluate.values import GroundTruth

_SPEC_FORMS = ("folders", "ukbench", "groups:FILE.csv", "oxford:GT_DIR", "revisited:GND.json",
               "revisited-easy:GND.json", "revisited-medium:GND.json", "revisited-hard:GND.json")


def parse_gt_spec(spec: str, db_paths: Sequence[str]) -> list[GroundTruth]:
    """Ground truth from a ``--gt`` SPEC, resolved against the store's item paths.

    ``folders``, ``ukbench``, ``groups:FILE.csv``, ``oxford:GT_DIR`` (Oxford or
    Paris), ``revisited:GND.json`` (three ground truths: easy, medium, hard) or
    ``revisited-<protocol>:GND.json`` (one). Returns a list, one per protocol.
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("folders", "ukbench"):
        if arg:
            raise UsageError(f"--gt {kind} takes no argument, got {spec!r}")
        return [class_folder_gt(db_paths) if kind == "folders" else ukbench_gt(db_paths)]
    needs_arg = {"groups": "FILE.csv", "oxford": "GT_DIR", "revisited": "GND.json",
                 **{f"revisited-{p}": "GND.json" for p in REVISITED_PROTOCOLS}}
    if kind not in needs_arg:
        raise UsageError(f"unknown ground-truth spec {spec!r}; valid forms: {', '.join(_SPEC_FORMS)}."
                         f"{suggest(kind, [*needs_arg, 'folders', 'ukbench'])}")
    if not arg:
        raise UsageError(f"--gt {kind} needs a file or folder: {kind}:{needs_arg[kind]}")
    if kind == "groups":
        return [groups_gt(arg, db_paths)]
    if kind == "oxford":
        return [load_oxford_gt(arg, db_paths)]
    protocols = list(REVISITED_PROTOCOLS) if kind == "revisited" else [kind.split("-", 1)[1]]
    return _revisited_gts(arg, db_paths, protocols)
