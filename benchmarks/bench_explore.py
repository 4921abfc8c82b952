"""Explore a collection from its features, measured in one run on a class-folder data set:
own classifier (cross-validation, 5 and 10 images per class), clusters (NMI/ARI with the true k and
the automatic choices), outliers (planted foreign photos among the top 10). Writes JSON.

    python benchmarks/bench_explore.py --data ../shared/data/flowers17 --store /tmp/flowers-store \
        --foreign /tmp/photos-store -o bench-explore.json

--store: the data set extracted with `deepfeat extract DATA -o STORE --pool gem --post l2` (made if
missing); --foreign: a store of foreign photos made the same way (e.g. the scikit-image samples of
`deepfeat.data.samples.write_sample_photos`), planted among the data set's vectors.

--finetune RUN_DIR: also `deepfeat finetune DATA -o RUN_DIR` with its defaults, timed, and the
classifier fitted (defaults) on fine-tuning's own train split and scored on its validation split,
timed as a user would pay it: one extraction of every image (train and validation, timed here
into a fresh store, RUN_DIR-classifier-store) + the fit with its cross-validation + the prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from deepfeat.collection.classifier import fit_classifier
from deepfeat.collection.clusters import agreement, cluster
from deepfeat.collection.labelled import from_store_gt
from deepfeat.collection.outliers import knn_outlier_scores
from deepfeat.store import FeatureStore


def few_shot(X, y, classes, per_class: int, repeats: int, seed: int) -> dict:
    """Train on *per_class* random images of each class (default settings), test on the rest."""
    accs, secs = [], []
    for r in range(repeats):
        rng = np.random.default_rng(seed + r)
        train = np.concatenate([rng.choice(np.nonzero(y == c)[0], per_class, replace=False)
                                for c in range(len(classes))])
        test = np.setdiff1d(np.arange(len(y)), train)
        t = time.perf_counter()
        clf = fit_classifier(X[train], y[train], classes, {}, seed=seed + r)
        secs.append(time.perf_counter() - t)
        accs.append(float((clf.predict_proba(X[test]).argmax(1) == y[test]).mean()))
    return {"per_class": per_class, "repeats": repeats, "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs)), "fit_seconds_mean": float(np.mean(secs))}


def _key(path: str) -> str:
    """folder/file: how a store row and a split line name the same image."""
    return "/".join(os.path.normpath(path).split(os.sep)[-2:])


def against_finetune(data_dir: str, run_dir: str, gt: str) -> dict:
    """`deepfeat finetune` (defaults) and the classifier on the same split, both timed (see the module docstring)."""
    from deepfeat.finetune.data import read_split
    from deepfeat.pipeline import ExtractConfig, extract

    if os.path.exists(run_dir):
        raise SystemExit(f"{run_dir} exists: give a new run directory")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deepfeat", "finetune", data_dir, "-o", run_dir], check=True)
    ft_seconds = time.perf_counter() - t
    meta = json.loads(open(os.path.join(run_dir, "meta.json")).read())
    train_keys = {_key(it.path) for it in read_split(os.path.join(run_dir, "train.txt"), data_dir)}
    val_keys = {_key(it.path) for it in read_split(os.path.join(run_dir, "val.txt"), data_dir)}

    store_dir = run_dir.rstrip("/") + "-classifier-store"
    shutil.rmtree(store_dir, ignore_errors=True)
    t = time.perf_counter()
    extract(ExtractConfig(inputs=[data_dir], output=store_dir, pooling="gem", post="l2", progress="none"))
    extract_seconds = time.perf_counter() - t
    d = from_store_gt(FeatureStore(store_dir), gt)
    keys = [_key(p) for p in d.paths]
    train = np.array([k in train_keys for k in keys])
    val = np.array([k in val_keys for k in keys])
    t = time.perf_counter()
    clf = fit_classifier(d.X[train], d.y[train], d.classes, {})
    fit_seconds = time.perf_counter() - t
    t = time.perf_counter()
    acc = float((clf.predict_proba(d.X[val]).argmax(1) == d.y[val]).mean())
    predict_seconds = time.perf_counter() - t
    total = extract_seconds + fit_seconds + predict_seconds
    out = {"split": {"train": int(train.sum()), "val": int(val.sum())},
           "finetune": {"val_accuracy": meta.get("val_accuracy"), "seconds_wall": round(ft_seconds, 1),
                        "seconds_training": meta.get("seconds")},
           "classifier": {"val_accuracy": acc, "method": clf.method, "params": clf.meta["params"],
                          "seconds_extract_all": round(extract_seconds, 1), "seconds_fit": round(fit_seconds, 1),
                          "seconds_predict": round(predict_seconds, 3), "seconds_total": round(total, 1)},
           "time_ratio_classifier_over_finetune": round(total / ft_seconds, 3)}
    print(f"finetune: val accuracy {meta.get('val_accuracy')} in {ft_seconds:.1f}s (wall, the whole command)")
    print(f"classifier on the same split: val accuracy {acc:.4f} ({clf.method} {clf.meta['params']}) in "
          f"{total:.1f}s = extract {extract_seconds:.1f}s (all {len(keys)} images, once) + fit {fit_seconds:.1f}s "
          f"+ predict {predict_seconds:.2f}s; time ratio {total / ft_seconds:.2f} of fine-tuning's")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--foreign", help="a store of foreign photos to plant for the outlier measurement")
    ap.add_argument("--gt", default="folders", help="where the classes come from: folders (default), ukbench...")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shots", type=lambda v: [int(x) for x in v.split(",")], default=[5, 10],
                    help="training images per class of the few-shot measurements (default 5,10; UKBench: 1,2,3)")
    ap.add_argument("--finetune", metavar="RUN_DIR", help="also fine-tune (a new run directory) and compare")
    ap.add_argument("--only-finetune", action="store_true", help="with --finetune: skip the other measurements")
    ap.add_argument("-o", "--output", default="bench-explore.json")
    args = ap.parse_args()
    if args.finetune and args.only_finetune:
        with open(args.output, "w") as f:
            json.dump({"data": args.data, "against_finetune": against_finetune(args.data, args.finetune, args.gt)},
                      f, indent=2)
        return
    if not (os.path.isdir(args.store) and os.path.isfile(os.path.join(args.store, "meta.json"))):
        from deepfeat.pipeline import ExtractConfig, extract

        t = time.perf_counter()
        extract(ExtractConfig(inputs=[args.data], output=args.store, pooling="gem", post="l2", progress="none"))
        print(f"extract: {time.perf_counter() - t:.1f}s")
    store = FeatureStore(args.store)
    data = from_store_gt(store, args.gt)
    X, y, classes = data.X, data.y, data.classes
    out: dict = {"data": args.data, "gt": args.gt, "images": len(y), "classes": len(classes)}

    t = time.perf_counter()
    clf = fit_classifier(X, y, classes, {})
    out["classifier_cv"] = {"method": clf.method, "params": clf.meta["params"], "accuracy": clf.meta["cv"]["accuracy"],
                            "folds": clf.meta["cv"]["folds"], "candidates": clf.meta["cv"]["candidates"],
                            "threshold": clf.threshold, "answered": clf.meta["cv"]["accepted"],
                            "accuracy_answered": clf.meta["cv"]["accuracy_accepted"],
                            "seconds": round(time.perf_counter() - t, 2)}
    print(f"classifier: {clf.meta['cv']['folds']}-fold CV accuracy {clf.meta['cv']['accuracy']:.4f} "
          f"({clf.method} {clf.meta['params']}) in {out['classifier_cv']['seconds']}s")
    for n in args.shots:
        if np.bincount(y).min() > n:
            fs = few_shot(X, y, classes, n, args.repeats, 0)
            out[f"classifier_{n}_per_class"] = fs
            print(f"classifier, {n} per class: {fs['accuracy_mean']:.4f} +- {fs['accuracy_std']:.4f} "
                  f"({args.repeats} draws, {fs['fit_seconds_mean']:.1f}s per fit)")

    out["clusters"] = {}
    for name, kw in (("true k", {"k": len(classes)}), ("hdbscan", {"auto": "hdbscan"}),
                     ("silhouette", {"auto": "silhouette"})):
        t = time.perf_counter()
        c = cluster(X, **kw)
        a = agreement(y, c.labels)
        out["clusters"][name] = {"k": c.k, **a, "seconds": round(time.perf_counter() - t, 2)}
        print(f"clusters, {name}: k = {c.k}, NMI {a['nmi']:.3f}, ARI {a['ari']:.3f} "
              f"({out['clusters'][name]['seconds']}s)")

    if args.finetune:
        out["against_finetune"] = against_finetune(args.data, args.finetune, args.gt)

    if args.foreign:
        F = FeatureStore(args.foreign).vectors()
        XA = np.concatenate([X, F])
        planted = set(range(len(X), len(XA)))
        out["outliers"] = {"planted": len(F)}
        for k in (1, 10):
            top = np.argsort(-knn_outlier_scores(XA, k))[:10]
            hits = sum(int(i) in planted for i in top)
            out["outliers"][f"k={k}"] = {"planted_in_top10": hits, "precision_at_10": hits / 10,
                                         "max_possible": min(10, len(F)) / 10,
                                         "top_ranks_of_planted": sorted(int(np.nonzero(top == i)[0][0]) + 1
                                                                        for i in planted if i in top)}
            print(f"outliers, k={k}: {hits} of the {len(F)} planted photos in the top 10 "
                  f"(ranks {out['outliers'][f'k={k}']['top_ranks_of_planted']})")
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
