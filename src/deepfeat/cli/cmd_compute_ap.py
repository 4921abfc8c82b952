"""``deepfeat compute-ap``: a drop-in for the Oxford Buildings ``compute_ap`` program.

Same arguments (``GT_PREFIX RANKED_LIST``), same single number on stdout, same
single-precision arithmetic, so scripts written around the original keep working.
"""

from __future__ import annotations

import math
import sys
from collections import Counter

from deepfeat.evaluate import average_precision, read_gt_lists, read_name_list


def register(sub) -> None:
    p = sub.add_parser(
        "compute-ap", help="AP of one ranked list on Oxford/Paris ground truth (drop-in for compute_ap)",
        description="Print the average precision of a ranked list of image names for one Oxford 5k / Paris 6k "
                    "query, exactly as the original compute_ap program prints it: positives are the names in "
                    "GT_PREFIX_good.txt and GT_PREFIX_ok.txt, names in GT_PREFIX_junk.txt are skipped, AP is "
                    "the trapezoidal area under precision-recall. Names are compared as exact strings "
                    "(surrounding whitespace and blank lines are ignored).")
    p.add_argument("gt_prefix", metavar="GT_PREFIX",
                   help="query ground truth without its suffix, e.g. gt_files_170407/all_souls_1")
    p.add_argument("ranked_list", metavar="RANKED_LIST",
                   help="text file with the ranked image names, best first, one per line (no extension)")
    p.set_defaults(func=run)


def format_ap(ap: float) -> str:
    """The value as the original prints it: ``cout << float`` gives 6 significant digits
    (``%g``), and with no positives it divides 0 by 0 and glibc prints ``-nan``."""
    return "-nan" if math.isnan(ap) else f"{ap:.6g}"


def run(args) -> int:
    positives, junk = read_gt_lists(args.gt_prefix)
    ranked = read_name_list(args.ranked_list, "ranked list")
    ap = average_precision(ranked, positives, junk)
    _warn(args, ranked, positives, junk)
    print(format_ap(ap))
    return 0


def _warn(args, ranked: list[str], positives: set[str], junk: set[str]) -> None:
    """Point out inputs that make the number meaningless; the original says nothing."""
    def warn(msg: str) -> None:
        print(f"deepfeat compute-ap: warning: {msg}", file=sys.stderr)

    if not positives:
        warn(f"{args.gt_prefix}_good.txt and _ok.txt are both empty: AP is undefined (-nan, as the original prints)")
        return
    dup = [name for name, n in Counter(ranked).items() if n > 1]
    if dup:
        warn(f"{len(dup)} names appear more than once in {args.ranked_list} (e.g. {', '.join(dup[:3])}); "
             f"each occurrence is counted, as the original program does")
    if ranked and not (positives | junk).intersection(ranked):
        warn(f"none of the {len(ranked)} ranked names is in the ground truth (first ranked: {ranked[0]!r}, "
             f"a positive: {min(positives)!r}); names must match exactly, without folders or extension")
