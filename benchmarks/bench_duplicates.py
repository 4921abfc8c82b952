#!/usr/bin/env python
"""Near-duplicate quality: pair precision, recall and F1 of deepfeat's duplicate finder
and of imagededup (PHash at its default; its CNN method on the store's descriptors, and end
to end through its ``CustomModel`` given the same EfficientNet-Lite0 and pooling) on the same
files, side by side in one run.

Set and store (a set from ``scripts/make_duplicate_set.py``, extracted as it is)::

    python scripts/make_duplicate_set.py --out dup-set
    deepfeat extract dup-set/images -o dup-store --pool gem --post l2
    python benchmarks/bench_duplicates.py --set dup-set --store dup-store --json dup-quality.json

Ground truth: every pair of images of the same ``groups.csv`` group. A method's predicted
pairs are every pair inside its groups (deepfeat: the connected components it reports;
imagededup: the pairs of the dictionary it returns). The k-NN candidates and their
inliers are computed once per extractor and every (threshold, min_inliers) cell is
scored from them, so the grid costs one verification pass per extractor.
imagededup is needed for its rows only (``pip install imagededup``; not a deepfeat dependency).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from deepfeat.collection.candidates import is_unit, knn_pairs, l2_normalised
from deepfeat.collection.confirm import confirm_pairs, feature_source
from deepfeat.collection.groups import connected_components
from deepfeat.collection.hashing import same_bytes, same_pixels
from deepfeat.index import Index
from deepfeat.localfeat.verify import VerifyParams
from deepfeat.store import FeatureStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_duplicates_scale import imagededup_cnn  # noqa: E402  (one copy: numpy-only module)


def imagededup_custom_model(store: FeatureStore):
    """imagededup's ``CustomModel`` holding the store's own network: its model, tapped layer and
    pooling (``deepfeat.backends.featurenet.FeatureNet``) after the store's resize policy, so that
    imagededup reads, preprocesses and encodes the files itself with the same EfficientNet-Lite0
    (its own decoder: no EXIF rotation, no JPEG draft) and no MobileNet download."""
    import torch
    from imagededup.utils.models import CustomModel
    from PIL import Image

    from deepfeat.backends.featurenet import FeatureNet
    from deepfeat.data.preprocess import parse_size_policy, resize_image
    from deepfeat.models import load_model
    from deepfeat.pooling import get_pooling

    meta = store.meta
    model = load_model(meta["model"]["spec"], device="cpu")
    fnet = FeatureNet(model, list(meta["layers"]), get_pooling(meta["pooling"])).eval()
    policy = parse_size_policy(meta["size"])

    class Descriptor(torch.nn.Module):  # imagededup wants (batch x features) from one tensor
        def __init__(self):
            super().__init__()
            self.fnet = fnet

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.fnet(x)[0]

    def transform(img: Image.Image) -> torch.Tensor:  # uint8 H x W x C, as FeatureNet takes it
        return torch.from_numpy(np.asarray(resize_image(img.convert("RGB"), policy, model.data_config)).copy())

    return CustomModel(name=f"deepfeat {meta['model']['spec']} {meta['pooling']}", model=Descriptor(),
                       transform=transform)


def truth_pairs(set_dir: Path, paths: list[str]) -> set[tuple[str, str]]:
    groups: dict[str, list[str]] = {}
    with open(set_dir / "groups.csv") as f:
        for row in csv.DictReader(f):
            if row["group"]:
                groups.setdefault(row["group"], []).append(row["path"])
    known = set(paths)
    missing = [p for g in groups.values() for p in g if p not in known]
    if missing:
        raise SystemExit(f"{len(missing)} set images are not in the store, e.g. {missing[0]}")
    return {tuple(sorted(p)) for g in groups.values() for p in combinations(g, 2)}


def scores(pred: set[tuple[str, str]], truth: set[tuple[str, str]]) -> dict[str, float]:
    tp = len(pred & truth)
    p = tp / len(pred) if pred else 0.0
    r = tp / len(truth) if truth else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 4),
            "pairs": len(pred)}


def group_pairs(n: int, a, b, names: list[str]) -> set[tuple[str, str]]:
    return {tuple(sorted((names[x], names[y]))) for g in connected_components(n, np.asarray(a), np.asarray(b))
            for x, y in combinations(g, 2)}


def relative(store: FeatureStore, set_dir: Path) -> list[str]:
    """Store paths as set-relative paths (images/<class>/<name>)."""
    return [Path(store.resolve_path(p)).resolve().relative_to(set_dir.resolve()).as_posix() for p in store.paths]


#: deepfeat's defaults (deepfeat.collection.duplicates.DuplicateSettings), whose false pairs --false-pairs lists
DEFAULT = {"extractor": "sift", "threshold": 0.5, "min_inliers": 16}


def write_false_pairs(path: str, pred: set, truth: set, edges: dict) -> None:
    """One CSV row per false positive and false negative of the default cell: the pair, its cosine
    and inliers when it was a verified candidate ('' when it was not a candidate: a false positive
    joined through a chain, or a true pair the k-NN never proposed)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["error", "a", "b", "cosine", "inliers"])
        for kind, pairs in (("false positive", pred - truth), ("false negative", truth - pred)):
            for a, b in sorted(pairs):
                c, i = edges.get((a, b), ("", ""))
                w.writerow([kind, a, b, c if c == "" else round(c, 4), i])
    print(f"false pairs of the default: {len(pred - truth)} false positives, {len(truth - pred)} false negatives "
          f"-> {path}", flush=True)


def deepfeat_rows(store: FeatureStore, names: list[str], truth, extractors, thresholds, inliers, plain,
                  false_pairs: str | None = None) -> list[dict]:
    files = [store.resolve_path(p) for p in store.paths]
    n = len(files)
    xb = store.vectors()
    xb = xb if is_unit(xb) else l2_normalised(xb)
    t0 = time.perf_counter()
    exact, _ = same_bytes(files)
    index = Index.build(xb, kind="flat", metric="ip")
    cand = knn_pairs(xb, index, min(thresholds + plain), k=10)
    near = cand.score >= 0.99
    exact += same_pixels(files, np.concatenate([cand.a[near], cand.b[near]]))
    base = time.perf_counter() - t0
    ea, eb = [p[0] for p in exact], [p[1] for p in exact]
    rows = []
    for t in plain:
        m = cand.score >= t
        rows.append({"method": "deepfeat --no-verify", "threshold": t, "min_inliers": None,
                     **scores(group_pairs(n, ea + cand.a[m].tolist(), eb + cand.b[m].tolist(), names), truth),
                     "seconds": round(base, 1)})
    for ex in extractors:
        m0 = cand.score >= min(thresholds)
        t1 = time.perf_counter()
        inl = confirm_pairs(cand.a[m0], cand.b[m0], feature_source(store, ex), VerifyParams(top=1, min_inliers=3),
                            spec=ex, enough=max(inliers))
        vsec = time.perf_counter() - t1
        ca, cb, cs = cand.a[m0], cand.b[m0], cand.score[m0]
        for t in thresholds:
            for mi in inliers:
                m = (cs >= t) & (inl >= mi)
                rows.append({"method": f"deepfeat --verify --extractor {ex}", "threshold": t, "min_inliers": mi,
                             **scores(group_pairs(n, ea + ca[m].tolist(), eb + cb[m].tolist(), names), truth),
                             "seconds": round(base + vsec, 1)})
        if false_pairs and ex == DEFAULT["extractor"]:
            m = (cs >= DEFAULT["threshold"]) & (inl >= DEFAULT["min_inliers"])
            edges = {tuple(sorted((names[x], names[y]))): (float(c), int(i)) for x, y, c, i in
                     zip(ca.tolist(), cb.tolist(), cs.tolist(), inl.tolist())}
            write_false_pairs(false_pairs, group_pairs(n, ea + ca[m].tolist(), eb + cb[m].tolist(), names), truth,
                              edges)
        best = max((r for r in rows if r["method"].endswith(ex)), key=lambda r: r["f1"])
        print(f"{ex}: verified {len(ca)} candidates in {vsec:.0f}s; best {best}", flush=True)
    return rows


def imagededup_rows(set_dir: Path, store: FeatureStore, names: list[str], truth, cnn_thresholds) -> list[dict]:
    try:
        from imagededup.methods import PHash
    except ImportError:
        print("imagededup is not installed: its rows are left out (pip install imagededup)")
        return []
    rows = []
    t0 = time.perf_counter()
    dups = PHash(verbose=False).find_duplicates(image_dir=str(set_dir / "images"), recursive=True,
                                                num_enc_workers=0, num_dist_workers=0)
    pred = {tuple(sorted(("images/" + a, "images/" + b))) for a, bs in dups.items() for b in bs}
    rows.append({"method": "imagededup PHash (default, max_distance 10)", "threshold": 10, "min_inliers": None,
                 **scores(pred, truth), "seconds": round(time.perf_counter() - t0, 1)})
    xb = store.vectors()
    enc = {names[i]: xb[i] for i in range(len(names))}
    cnn = imagededup_cnn()
    for t in cnn_thresholds:
        t0 = time.perf_counter()
        dups = cnn.find_duplicates(encoding_map=enc, min_similarity_threshold=t, num_sim_workers=0)
        pred = {tuple(sorted((a, b))) for a, bs in dups.items() for b in bs}
        rows.append({"method": "imagededup CNN (the store's descriptors)", "threshold": t,
                     "min_inliers": None, **scores(pred, truth), "seconds": round(time.perf_counter() - t0, 1)})
    rows += imagededup_custom_rows(set_dir, store, names, truth, cnn_thresholds)
    return rows


def imagededup_custom_rows(set_dir: Path, store: FeatureStore, names: list[str], truth, thresholds) -> list[dict]:
    """imagededup's CNN method end to end (its own reading and encoding of the files) with the
    store's network given through its ``CustomModel``; its encodings are compared with the store's."""
    from imagededup.methods import CNN

    t0 = time.perf_counter()
    cnn = CNN(verbose=False, model_config=imagededup_custom_model(store))
    enc = {"images/" + k: v for k, v in cnn.encode_images(image_dir=str(set_dir / "images"), recursive=True).items()}
    enc_sec = time.perf_counter() - t0
    xb = store.vectors()
    xb = xb if is_unit(xb) else l2_normalised(xb)
    mine = l2_normalised(np.stack([enc[n] for n in names]).astype(np.float32))
    cos = (mine * xb).sum(1)
    print(f"imagededup CustomModel: {len(enc)} encodings in {enc_sec:.0f}s; cosine with the store's descriptors "
          f"min {cos.min():.4f}, median {np.median(cos):.4f}", flush=True)
    rows = []
    for t in thresholds:
        t0 = time.perf_counter()
        dups = cnn.find_duplicates(encoding_map=enc, min_similarity_threshold=t, num_sim_workers=0)
        pred = {tuple(sorted((a, b))) for a, bs in dups.items() for b in bs}
        rows.append({"method": "imagededup CNN (CustomModel: the same EfficientNet-Lite0 + GeM)", "threshold": t,
                     "min_inliers": None, **scores(pred, truth),
                     "seconds": round(enc_sec + time.perf_counter() - t0, 1)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", required=True, type=Path, help="a folder from scripts/make_duplicate_set.py")
    ap.add_argument("--store", required=True, help="its images extracted into a store")
    ap.add_argument("--extractors", default="cnn,sift", help="local features to verify with (default cnn,sift)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--false-pairs", metavar="CSV", help="write the default's false positives and negatives here")
    args = ap.parse_args()
    store = FeatureStore(args.store)
    names = relative(store, args.set)
    truth = truth_pairs(args.set, names)
    thresholds, inliers = [0.3, 0.4, 0.5, 0.6, 0.7], [8, 12, 16, 20, 30]
    plain = [0.8, 0.85, 0.9, 0.95]
    rows = deepfeat_rows(store, names, truth, args.extractors.split(","), thresholds, inliers, plain,
                         args.false_pairs)
    rows += imagededup_rows(args.set, store, names, truth, plain)
    print(f"{len(names)} images, {len(truth)} true pairs")
    print(f"{'method':58s} {'thr':>5s} {'inl':>4s} {'P':>6s} {'R':>6s} {'F1':>6s} {'pairs':>6s} {'s':>6s}")
    for r in rows:
        print(f"{r['method']:58s} {r['threshold']:>5} {r['min_inliers'] or '':>4} {r['precision']:6.3f} "
              f"{r['recall']:6.3f} {r['f1']:6.3f} {r['pairs']:6d} {r['seconds']:6.1f}")
    best = max(rows, key=lambda r: r["f1"])
    print(f"best F1: {best['method']} threshold {best['threshold']} min_inliers {best['min_inliers']}: {best['f1']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": len(names), "true_pairs": len(truth), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
