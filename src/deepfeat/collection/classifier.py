"""Your own classifier on a store's descriptors: logistic regression or cosine k-NN, the
regularisation or k chosen by stratified k-fold cross-validation, probabilities calibrated by a
temperature fitted on the held-out folds, and an "unknown" answer below a probability threshold
(given, or chosen on the held-out folds: the one that keeps 95% of the correct answers).

A :class:`Classifier` is a self-describing folder: ``classifier.json`` (the descriptor recipe of
the store it was fitted on: model spec and weights hash, layer, pooling, post-processing, size;
the classes, method, parameters, temperature, threshold and the cross-validation report) and
``weights.npz`` (arrays only, read with ``allow_pickle=False``), plus the store's fitted
``post.npz``/``pooling.npz`` when it has them."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from deepfeat.backends.embedder import Embedder
from deepfeat.collection import linear
from deepfeat.errors import FormatError, UsageError
from deepfeat.models.classify import ClassifyResult, Prediction

log = logging.getLogger(__name__)

FORMAT = "deepfeat-classifier"
#: 2: logistic regression on L2-normalised rows; 1 (still read): standardisation folded into the weights
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
METHODS = ("auto", "logreg", "knn")
#: candidates tried by cross-validation: inverse regularisation C (L2-normalised rows), k
LOGREG_C = (1.0, 10.0, 100.0, 1000.0)
KNN_K = (1, 5, 10, 20)
#: the automatic threshold keeps this share of the correct held-out answers
KEEP_CORRECT = 0.95


@dataclass
class LabelResult(ClassifyResult):
    """A :class:`~deepfeat.models.classify.ClassifyResult` with the answer: the top class, or
    ``"unknown"`` when its probability is below the classifier's threshold."""

    label: str | None = None
    threshold: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.ok:
            d["label"] = self.label
            d["threshold"] = self.threshold
        return d


class Classifier:
    """A fitted classifier over descriptors (see the module docstring). Make one with
    :func:`fit_classifier` or :meth:`load`."""

    def __init__(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], folder: str | os.PathLike | None = None):
        self.meta = meta
        self.arrays = arrays
        self.folder = Path(folder) if folder is not None else None
        #: embed images with the training store's prepared graph where there is one (docs/startup.md)
        self.graph_cache = False
        self._embedder: Embedder | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.meta["threshold"] = check_threshold(value)
        self.meta["threshold_rule"] = "given"

    # -- scoring vectors ---------------------------------------------------------

    def logits(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.meta["dim"]:
            raise UsageError(f"expected N x {self.meta['dim']} descriptors, got shape {X.shape}")
        if self.method == "knn":
            return linear.knn_logits(self.arrays, X, int(self.meta["params"]["k"]), len(self.classes))
        rows = "l2" if self.meta["format_version"] >= 2 else "as-is"
        return np.concatenate([linear.logreg_logits(self.arrays, X[s:s + linear.CHUNK], rows)
                               for s in range(0, len(X), linear.CHUNK)]) if len(X) else np.zeros((0, len(self.classes)))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities, N x C float32, columns in :attr:`classes` order."""
        return linear.softmax(self.logits(X), float(self.meta["temperature"]))

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(class index per row, -1 for unknown; its probability), computed in bounded chunks."""
        idx = np.empty(len(X), np.int64)
        prob = np.empty(len(X), np.float32)
        for s in range(0, len(X), linear.CHUNK):
            p = self.predict_proba(X[s:s + linear.CHUNK])
            idx[s:s + len(p)] = p.argmax(axis=1)
            prob[s:s + len(p)] = p.max(axis=1)
        idx[prob < self.threshold] = -1
        return idx, prob

    def results(self, paths: Sequence[str], X: np.ndarray, errors: Sequence[str | None], k: int = 5
                ) -> list[LabelResult]:
        """One :class:`LabelResult` per path, rows of *X* belonging to the paths without an error."""
        if k < 1:
            raise UsageError(f"--top must be at least 1, not {k}")
        probs = self.predict_proba(X) if len(X) else np.zeros((0, len(self.classes)), np.float32)
        out, row = [], 0
        for path, err in zip(paths, errors):
            if err is not None:
                out.append(LabelResult(path, error=err))
                continue
            p = probs[row]
            row += 1
            top = np.argsort(-p, kind="stable")[:k]
            preds = [Prediction(int(i), self.classes[i], float(p[i])) for i in top]
            label = preds[0].label if preds[0].prob >= self.threshold else "unknown"
            out.append(LabelResult(path, predictions=preds, label=label, threshold=self.threshold))
        return out

    # -- images --------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            if self.folder is None:
                raise UsageError("save the classifier before classifying images (its descriptor files live there)")
            self._embedder = Embedder(self.meta["descriptor"], self.folder, graph_cache=self.graph_cache)
        return self._embedder

    def classify_files(self, paths: Sequence[str], k: int = 5) -> list[LabelResult]:
        """Describe image files as the training store was made, then label them; bad images are
        reported per image, never raised."""
        X, errors = self.embedder.embed_files(paths)
        return self.results(paths, X, errors, k)

    def classify_image(self, image: str | os.PathLike | BinaryIO, k: int = 5) -> LabelResult:
        X = self.embedder.embed_pixels([self.embedder.decode(image)])
        return self.results([str(getattr(image, "name", image))], X, [None], k)[0]

    # -- files -----------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> Path:
        from deepfeat.store.atomic import atomic_write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "weights.npz", **{k: np.ascontiguousarray(v) for k, v in self.arrays.items()})
        atomic_write_json(folder / "classifier.json", self.meta)
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Classifier:
        folder = Path(folder)
        meta_path = folder / "classifier.json"
        if not meta_path.is_file():
            raise UsageError(f"{folder} is not a classifier folder (no classifier.json); "
                             f"make one with `deepfeat fit-classifier`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{meta_path}: not a valid JSON file ({e})") from None
        if meta.get("format") != FORMAT or meta.get("format_version") not in READ_VERSIONS:
            raise FormatError(f"{meta_path}: not a {FORMAT} file of version {' or '.join(map(str, READ_VERSIONS))} "
                              f"(format {meta.get('format')!r}, version {meta.get('format_version')!r})")
        try:
            with np.load(folder / "weights.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise FormatError(f"{folder / 'weights.npz'}: cannot read the classifier's weights ({e})") from None
        need = ("vectors", "labels") if meta["method"] == "knn" else ("weight", "bias")
        missing = [k for k in need if k not in arrays]
        if missing:
            raise FormatError(f"{folder / 'weights.npz'}: missing arrays {missing}")
        return cls(meta, arrays, folder)


def check_threshold(value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise UsageError(f"the threshold is a probability between 0 and 1, not {value}")
    return float(value)


def _fit(method: str, param: float, X: np.ndarray, y: np.ndarray, n_classes: int, seed: int) -> dict[str, np.ndarray]:
    if method == "knn":
        return {"vectors": np.ascontiguousarray(X, np.float32), "labels": y.astype(np.int64)}
    return linear.fit_logreg(X, y, n_classes, C=param, seed=seed)


def _logits(method: str, param: float, arrays: dict[str, np.ndarray], X: np.ndarray, n_classes: int) -> np.ndarray:
    if method == "knn":
        return linear.knn_logits(arrays, X, int(param), n_classes)
    return linear.logreg_logits(arrays, X)


def cross_validate(X: np.ndarray, y: np.ndarray, n_classes: int, method: str = "auto", folds: int = 5,
                   seed: int = 0) -> dict[str, Any]:
    """Held-out logits of every candidate (method, C or k) on the same stratified folds; returns
    ``{"folds", "candidates": [{method, param, accuracy}], "best": (method, param), "oof": logits}``."""
    linear.require_sklearn()
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    counts = np.bincount(y, minlength=n_classes)
    if counts.min() < 2:
        raise UsageError(f"every class needs at least 2 images for cross-validation; class {int(counts.argmin())} "
                         f"has {int(counts.min())}")
    n_splits = int(min(folds, counts.min()))
    cands = ([("logreg", c) for c in LOGREG_C] if method in ("auto", "logreg") else []) + \
            ([("knn", k) for k in KNN_K] if method in ("auto", "knn") else [])
    oof = {c: np.zeros((len(y), n_classes), np.float32) for c in cands}
    split = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(X, y)
    with threadpool_limits(limits=1):  # small problems: one BLAS thread is ~15x faster than many contending
        for train, test in split:
            for m, p in cands:
                arrays = _fit(m, p, X[train], y[train], n_classes, seed)
                oof[(m, p)][test] = _logits(m, p, arrays, X[test], n_classes)
    rows = [{"method": m, "param": p, "accuracy": float((oof[(m, p)].argmax(1) == y).mean()),
             "nll": round(linear.nll(oof[(m, p)], y), 4)} for m, p in cands]
    # C by held-out log-loss (smooth; accuracy on folds of a few images per class is coarse and
    # picked too strong a regularisation), k by accuracy; then the family with the better accuracy
    finalists = [min((r for r in rows if r["method"] == "logreg"), key=lambda r: r["nll"], default=None),
                 max((r for r in rows if r["method"] == "knn"), key=lambda r: r["accuracy"], default=None)]
    best = max((r for r in finalists if r is not None), key=lambda r: r["accuracy"])  # ties: logreg
    return {"folds": n_splits, "candidates": rows, "best": (best["method"], best["param"]),
            "oof": oof[(best["method"], best["param"])]}


def per_class_report(y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision and recall and the confusion matrix (rows = true class)."""
    C = len(classes)
    conf = np.zeros((C, C), np.int64)
    np.add.at(conf, (y, pred), 1)
    tp = np.diag(conf).astype(float)
    prec = np.divide(tp, conf.sum(0), out=np.zeros(C), where=conf.sum(0) > 0)
    rec = np.divide(tp, conf.sum(1), out=np.zeros(C), where=conf.sum(1) > 0)
    return {"accuracy": float(tp.sum() / max(1, conf.sum())),
            "per_class": [{"class": c, "precision": round(float(p), 4), "recall": round(float(r), 4),
                           "n": int(n)} for c, p, r, n in zip(classes, prec, rec, conf.sum(1))],
            "confusion": conf.tolist()}


def fit_classifier(X: np.ndarray, y: np.ndarray, classes: Sequence[str], descriptor: dict[str, Any], *,
                   method: str = "auto", threshold: float | str = "auto", folds: int = 5, seed: int = 0,
                   source: str = "") -> Classifier:
    """Fit on N x D descriptors *X* with class indices *y* (into *classes*); *descriptor* is the
    recipe of the store they came from (:func:`deepfeat.backends.embedder.descriptor_recipe`)."""
    if method not in METHODS:
        raise UsageError(f"unknown classifier method {method!r}; choose from {', '.join(METHODS)}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or len(X) != len(y) or not len(X):
        raise UsageError(f"need N x D descriptors and N labels, got {X.shape} and {y.shape}")
    if len(classes) < 2:
        raise UsageError(f"a classifier needs at least two classes, got {list(classes)}")
    t0 = time.perf_counter()
    cv = cross_validate(X, y, len(classes), method, folds, seed)
    m, p = cv["best"]
    temperature = linear.fit_temperature(cv["oof"], y)
    oof_p = linear.softmax(cv["oof"], temperature)
    pred, conf = oof_p.argmax(1), oof_p.max(1)
    correct = pred == y
    if threshold == "auto":
        thr, rule = float(np.quantile(conf[correct], 1 - KEEP_CORRECT)) if correct.any() else 0.0, \
            f"keeps {KEEP_CORRECT:.0%} of the correct held-out answers"
    else:
        thr, rule = check_threshold(float(threshold)), "given"
    accepted = conf >= thr
    report = per_class_report(y, pred, classes)
    report.update(folds=cv["folds"], candidates=cv["candidates"],
                  accepted=round(float(accepted.mean()), 4),
                  accuracy_accepted=round(float(correct[accepted].mean()), 4) if accepted.any() else None)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        arrays = _fit(m, p, X, y, len(classes), seed)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "deepfeat_version": _version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": m,
            "params": {"k": int(p)} if m == "knn" else {"C": float(p)}, "temperature": temperature,
            "threshold": thr, "threshold_rule": rule, "classes": list(classes), "dim": int(X.shape[1]),
            "descriptor": descriptor,
            "training": {"source": source, "images": len(y),
                         "per_class": np.bincount(y, minlength=len(classes)).tolist(), "seed": seed,
                         "seconds": round(time.perf_counter() - t0, 2)},
            "cv": report}
    log.info("fitted %s %s on %d images in %.1fs: CV accuracy %.4f", m, meta["params"], len(y),
             meta["training"]["seconds"], report["accuracy"])
    return Classifier(meta, arrays)


def _version() -> str:
    from deepfeat import __version__

    return __version__
