"""``deepfeat classify``: top-k labels with probabilities, one line per image."""

from __future__ import annotations

import sys
import time

from deepfeat.cli.common import add_model_args, print_json
from deepfeat.data.images import discover
from deepfeat.models.classify import classify_iter


def register(sub) -> None:
    p = sub.add_parser("classify", help="top-k class labels with probabilities",
                       description="Classify images (files, folders, globs, @list.txt). Bad images are reported "
                                   "per image; the exit code is non-zero only when nothing could be classified.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, folders, glob patterns or @list.txt")
    add_model_args(p, labels=True)
    p.add_argument("--top", "-k", type=int, default=5, metavar="K", help="labels per image (default 5)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="decode threads (default 2)")
    p.add_argument("--json", action="store_true", help="one JSON document with every result")
    p.add_argument("--no-cache", dest="graph_cache", action="store_false",
                   help="classify in PyTorch, without the graph cache's classifier graph (with --classifier: "
                        "descriptor graph) ($DEEPFEAT_CACHE, else ~/.cache/deepfeat; docs/startup.md)")
    p.add_argument("--classifier", metavar="CLF", help="your own classes: a folder made by `deepfeat fit-classifier` "
                                                       "(its own model and descriptor; --model is ignored)")
    p.set_defaults(func=run)


def _expand(inputs: list[str]) -> list[str]:
    """Like discover(), but a missing path is an image result, not a fatal error."""
    from deepfeat.errors import UsageError

    out = []
    for item in inputs:
        try:
            out.extend(discover([item]))
        except UsageError:
            out.append(item)
    return out


def _own_classifier(args, paths: list[str]):
    """Results of a `deepfeat fit-classifier` folder, and a (model, device) line for the summary."""
    from deepfeat.collection import Classifier

    clf = Classifier.load(args.classifier)
    clf.graph_cache = args.graph_cache
    return clf.classify_files(paths, k=args.top), f"{args.classifier} ({clf.method} on {clf.meta['descriptor']['model']['spec']})"


def _network(args):
    """The classifier to run: on the CPU with the graph cache, the model's graph (a prepared one from an
    earlier run, without PyTorch; else exported now for the next run: docs/startup.md); otherwise, or when
    the model is not one the cache prepares, the model in eager PyTorch. Returns (model, predict or None)."""
    from deepfeat.backends import classify_graph
    from deepfeat.backends.export_cache import open_cache
    from deepfeat.backends.prepared import cpu_only

    cache = open_cache(args.graph_cache) if cpu_only(args.device) else None
    graph = classify_graph.lookup(args.model, args.labels, cache) if cache is not None else None
    if graph is not None:
        return graph, graph.predict
    from deepfeat.models import load_model

    model = load_model(args.model, device=args.device, labels=args.labels)
    graph = classify_graph.prepare(model, args.labels, cache) if cache is not None else None
    return (model, None) if graph is None else (graph, graph.predict)


def run(args) -> int:
    paths = _expand(args.inputs)
    t0 = time.perf_counter()
    if args.classifier:
        found, model_name, device = *_own_classifier(args, paths), "cpu"
    else:
        model, predict = _network(args)
        found = classify_iter(model, paths, k=args.top, batch_size=args.batch_size, workers=args.workers,
                              predict=predict)
        model_name, device = model.spec, model.device
    results, ok = [], 0
    for r in found:
        ok += r.ok
        if args.json:
            results.append(r.to_dict())
            continue
        if r.ok:
            preds = "  ".join(f"{p.prob:.3f} {p.label.split(',')[0]}" for p in r.predictions)
            unknown = f"unknown (below {r.threshold:.3f})  " if getattr(r, "label", None) == "unknown" else ""
            print(f"{r.path}: {unknown}{preds}")
        else:
            print(f"{r.path}: ERROR {r.error}")
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    failed = len(paths) - ok
    summary = {"images": len(paths), "classified": ok, "failed": failed, "seconds": round(dt, 3),
               "images_per_s": round(ok / dt, 2) if dt > 0 else None, "model": model_name,
               "device": str(device)}
    if args.json:
        print_json({"results": results, "summary": summary})
    else:
        print(f"\n{ok}/{len(paths)} images classified ({failed} failed) in {dt:.2f}s, "
              f"{summary['images_per_s']} images/s on {device}", file=sys.stderr)
    return 0 if ok > 0 else 1
