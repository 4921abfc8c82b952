"""``deepfeat recipe``: find the best pipeline for a dataset and write it as a file."""

from __future__ import annotations

import sys

from deepfeat.cli.cmd_sweep import _split
from deepfeat.cli.common import add_model_args
from deepfeat.tune.recipe import DEFAULT_POOLS, DEFAULT_POSTS, DEFAULT_RERANKS, MS_POOLS, MS_SCALES, make_recipe


def register(sub) -> None:
    p = sub.add_parser("recipe", help="find the best layer/pooling/post/re-ranking for a dataset, write it as a file",
                       description="A small sweep (layers x poolings x post-processing x re-ranking, plus the "
                                   "multi-scale regional baseline "
                                   f"{'/'.join(MS_POOLS)} over scales {','.join(f'{s:g}' for s in MS_SCALES)} "
                                   "with PCA-whitening, then query expansion / DBA on the winner), evaluated "
                                   "with --gt; the winner is written to -o as JSON for "
                                   "`extract/search/eval/serve --recipe FILE`.")
    p.add_argument("dataset", nargs="+", metavar="DATASET", help="image folder(s), globs or @list.txt")
    p.add_argument("--gt", required=True, metavar="SPEC", help="folders | groups:FILE.csv | ukbench | oxford:DIR")
    p.add_argument("-o", "--output", required=True, metavar="RECIPE.json")
    add_model_args(p)
    p.add_argument("--layers", default="default", metavar="L1,L2,...", help="single-scale layers (default: the last "
                                                                             "feature map)")
    p.add_argument("--pools", default=",".join(DEFAULT_POOLS), metavar="P1,P2,...")
    p.add_argument("--post", default=";".join(DEFAULT_POSTS), metavar="C1;C2;...",
                   help="single-scale post-processing chains separated by ';' (default l2)")
    p.add_argument("--rerank", default=",".join(DEFAULT_RERANKS), metavar="R1,R2,...",
                   help=f"re-rankings tried on every candidate (default {','.join(DEFAULT_RERANKS)})")
    p.add_argument("--no-regional", dest="regional", action="store_false",
                   help="leave out the multi-scale regional candidate")
    p.add_argument("--whiten-dim", type=int, default=256, metavar="D",
                   help="PCA-whitening dimensions of the regional candidate (default 256)")
    p.add_argument("--fit-on", nargs="+", metavar="IMAGES",
                   help="separate images to learn PCA/whitening on (else the dataset itself, with a warning)")
    p.add_argument("--size", default="model", metavar="POLICY")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--workers", type=int, default=None, metavar="N")
    p.set_defaults(func=run)


def run(args) -> int:
    r = make_recipe(args.dataset, args.gt, args.output, model_spec=args.model, layers=_split(args.layers),
                    pools=_split(args.pools), posts=[c.strip() for c in args.post.split(';') if c.strip()], reranks=_split(args.rerank),
                    regional=args.regional, whiten_dim=args.whiten_dim, fit_on=args.fit_on, size=args.size,
                    batch_size=args.batch_size, workers=args.workers,
                    device=args.device if args.device != "auto" else "cpu")
    cands = sorted((c for c in r["candidates"] if c["map"] is not None), key=lambda c: -c["map"])
    print(f"{len(r['candidates'])} candidates on {r['n_images']} images ({r['protocol']}), {r['seconds']:.0f}s; "
          f"the best {min(5, len(cands))}:")
    for c in cands[:5]:
        print(f"  mAP {100 * c['map']:6.2f}  {_describe(c)}")
    ex, se = r["extract"], r["search"]
    print(f"recipe: {_describe({**ex, **se, 'post': ex['post_spec']})} -> {args.output}")
    if ex["post"] != ex["post_spec"]:
        print(f"fitted post-processing ({ex['post_spec']}, on {r['fit_on']}): {ex['post']} next to the recipe",
              file=sys.stderr)
    return 0


def _describe(c: dict) -> str:
    scales = ",".join(f"{s:g}" for s in c["scales"])
    parts = [c["layer"], c["pooling"], f"scales {scales}", f"post {c['post']}"]
    if c.get("qe"):
        parts.append(f"qe {c['qe']}")
    if c.get("dba"):
        parts.append(f"dba {c['dba']}")
    parts.append(f"rerank {c['rerank'] or 'none'}")
    return ", ".join(parts)
