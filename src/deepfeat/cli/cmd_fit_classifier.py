"""``deepfeat fit-classifier``: your own classifier from labelled images or a store's features."""

from __future__ import annotations

import sys
import time

from deepfeat.cli.common import format_table, print_json


def register(sub) -> None:
    p = sub.add_parser("fit-classifier", help="fit your own classifier on the features of labelled images",
                       description="Fit logistic regression or k-NN on descriptors of labelled images (class "
                                   "folders, a path,label CSV, or a feature store with --gt), choosing C or k by "
                                   "cross-validation, calibrating probabilities and an 'unknown' threshold. "
                                   "Use it with `deepfeat classify IMAGES --classifier CLF`.")
    p.add_argument("labelled", metavar="LABELLED", help="class folders, a path,label CSV, or a feature store")
    p.add_argument("-o", "--output", required=True, metavar="CLF", help="the classifier folder to write")
    p.add_argument("--gt", default="folders", metavar="SPEC",
                   help="with a store: where the classes come from (folders, groups:FILE.csv, ukbench; default folders)")
    p.add_argument("--store", metavar="DIR", help="with images: extract into this store (default CLF/train-store)")
    p.add_argument("--model", "-m", default="efficientnet_lite0", metavar="SPEC", help="with images: model spec")
    p.add_argument("--layer", default="default", metavar="NAME", help="with images: the layer to tap")
    p.add_argument("--pool", default="default", metavar="NAME[:ARGS]", help="with images: pooling (default gem)")
    p.add_argument("--post", default="l2", metavar="CHAIN", help="with images: post-processing (default l2)")
    p.add_argument("--no-cache", dest="graph_cache", action="store_false",
                   help="with images: extract without the graph cache (exported graphs and prepared networks, "
                        "docs/startup.md)")
    p.add_argument("--feature", metavar="LAYER", help="with a store of several layers: which one")
    p.add_argument("--method", default="auto", choices=("auto", "logreg", "knn"),
                   help="auto (default): the better of the two by cross-validation")
    p.add_argument("--threshold", default="auto", metavar="P|auto",
                   help="answer 'unknown' below this probability; auto (default): the one keeping 95%% of the "
                        "correct held-out answers; 0: never")
    p.add_argument("--folds", type=int, default=5, metavar="N", help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the classifier's meta as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from deepfeat.collection.fitting import fit_from
    from deepfeat.errors import UsageError

    try:
        threshold = args.threshold if args.threshold == "auto" else float(args.threshold)
    except ValueError:
        raise UsageError(f"--threshold takes a probability or auto, not {args.threshold!r}") from None
    opts = {"model": args.model, "layers": [args.layer], "pooling": args.pool, "post": args.post,
            "graph_cache": args.graph_cache}
    t0 = time.perf_counter()
    clf = fit_from(args.labelled, args.output, gt=args.gt, store_dir=args.store, extract_options=opts,
                   feature=args.feature, method=args.method, threshold=threshold, folds=args.folds, seed=args.seed)
    dt = time.perf_counter() - t0
    if args.json:
        print_json(clf.meta)
        return 0
    m, cv = clf.meta, clf.meta["cv"]
    tried = "  ".join(f"{c['method']}:{'C' if c['method'] == 'logreg' else 'k'}={c['param']:g} {c['accuracy']:.1%}"
                      for c in cv["candidates"])
    print(f"{m['training']['images']} images, {len(clf.classes)} classes; {cv['folds']}-fold cross-validation: {tried}")
    rows = [[r["class"], r["n"], f"{r['precision']:.3f}", f"{r['recall']:.3f}"] for r in cv["per_class"]]
    print(format_table(rows, ["class", "images", "precision", "recall"], "lrrr"))
    param = ", ".join(f"{k}={v:g}" for k, v in m["params"].items())
    print(f"chosen: {m['method']} ({param}), held-out accuracy {cv['accuracy']:.1%}; temperature {m['temperature']:.3f}; "
          f"unknown below p={m['threshold']:.3f} ({m['threshold_rule']}): {cv['accepted']:.1%} of held-out images "
          f"answered, {cv['accuracy_accepted']:.1%} of those correct")
    sys.stdout.flush()
    print(f"saved {args.output} ({m['training']['seconds']:.1f}s fitting, {dt:.1f}s in all)", file=sys.stderr)
    return 0
