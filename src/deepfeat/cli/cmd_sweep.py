"""``deepfeat sweep``: the layer x pooling x post-processing table for a dataset."""

from __future__ import annotations

import sys

from deepfeat.cli.common import add_model_args
from deepfeat.specs import parse_scales


def _split(text: str) -> list[str]:
    """Split on commas that separate items: 'gem,rmac:L=3,crow:a=2,b=2' keeps 'crow:a=2,b=2'."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if out and ("=" in part and ":" not in part and not part.startswith(("pca", "l2", "power", "sqrt"))):
            out[-1] += "," + part  # a key=value continuing the previous item's arguments
        else:
            out.append(part)
    return out


def register(sub) -> None:
    p = sub.add_parser("sweep", help="compare layers x poolings x post-processing on a dataset (mAP table)",
                       description="Extract once, pool every way, post-process every way, evaluate, and print "
                                   "the mAP table (rows layer x pooling, columns post-processing) as Markdown, "
                                   "plus CSV/JSON files in --out.")
    p.add_argument("dataset", nargs="+", metavar="DATASET", help="image folder(s), globs or @list.txt")
    p.add_argument("--gt", required=True, metavar="SPEC", help="folders | groups:FILE.csv | ukbench | oxford:DIR")
    add_model_args(p)
    p.add_argument("--layers", default="default", metavar="L1,L2,...")
    p.add_argument("--pools", default="gem,mac,rmac,crow,spoc", metavar="P1,P2,...")
    p.add_argument("--post", default="none;l2;pca-whiten:128,l2", metavar="C1;C2;...",
                   help="post-processing chains separated by ';' (a chain may contain commas), "
                        "e.g. 'none;l2;pca:128,l2;pca-whiten:128,l2'; a saved chain file (.npz) is applied "
                        "as it is (its column is named by its path)")
    p.add_argument("--rerank", default="none", metavar="R1,R2,...",
                   help="re-rankings to add as columns after each post-processing: none, diffusion, kreciprocal, "
                        "with parameters, e.g. none,diffusion,kreciprocal:k1=20,k2=6")
    p.add_argument("--scales", default="1", metavar="S1,S2,...", help="multi-scale descriptors, e.g. 1,0.7071,0.5")
    p.add_argument("--fit-on", nargs="+", metavar="IMAGES", help="separate images to fit PCA/whitening on")
    p.add_argument("--size", default="model", metavar="POLICY")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--workers", type=int, default=None, metavar="N")
    p.add_argument("--verify", metavar="N[:ARGS]",
                   help="add a '+verify N' twin of every column: the top N re-ordered by spatial verification")
    p.add_argument("--local", default="cnn", metavar="cnn|sift|orb[:ARGS]",
                   help="local features for --verify (default cnn)")
    p.add_argument("--out", default="sweep-out", metavar="DIR", help="where to write the .md/.csv/.json tables")
    p.set_defaults(func=run)


def _posts(text: str) -> list[str]:
    if ";" in text:
        return [t.strip() for t in text.split(";") if t.strip()]
    # no ';': the historic comma form 'none,l2,pca:128,pca-whiten:128' (single-step chains)
    return [t.strip() for t in text.split(",") if t.strip()]


def run(args) -> int:
    from deepfeat.tune.sweep import sweep, write_outputs

    results = sweep(args.dataset, args.gt, _split(args.layers), _split(args.pools), _posts(args.post),
                    model_spec=args.model, fit_on=args.fit_on, size=args.size, batch_size=args.batch_size,
                    workers=args.workers, device=args.device if args.device != "auto" else "cpu",
                    reranks=_split(args.rerank), scales=parse_scales(args.scales), verify=args.verify,
                    local=args.local)
    for r in results:
        best = r.best()
        print(f"\n## {r.protocol}: mAP (%) of {r.model} on {r.n_images} images "
              f"({r.n_failed} failed), PCA fitted on {r.fit_source}\n")
        print(r.markdown())
        if best:
            c = r.cells[best]
            print(f"\nbest: layer {best[0]}, pooling {best[1]}, post {best[2]}: "
                  f"mAP {100 * c['map']:.2f}"
                  + (f", N-S {c['ns']:.3f}" if c.get("ns") is not None else ""))
        print(f"({r.seconds:.1f}s, of which extraction {r.extract_seconds:.1f}s)", file=sys.stderr)
    files = write_outputs(results, args.out)
    print(f"\nwrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0
