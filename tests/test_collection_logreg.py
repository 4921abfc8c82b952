"""The classifier's logistic regression on L2-normalised rows (format 2) and the reading of format-1
folders (standardisation folded into the weights, applied to rows as they are)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from deepfeat.collection import linear
from deepfeat.collection.classifier import Classifier


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16))
    y = np.repeat(np.arange(3), 10)
    return (centres[y] + 0.3 * rng.normal(size=(30, 16))).astype(np.float32), y


def test_logreg_sees_only_the_direction_of_a_row():
    X, y = _blobs()
    arrays = linear.fit_logreg(X, y, 3, C=100.0)
    logits = linear.logreg_logits(arrays, X)
    assert (logits.argmax(1) == y).all()
    # rows scaled by any positive factor: the same logits (fitted and applied on L2-normalised rows)
    scaled = X * np.linspace(0.1, 10, len(X), dtype=np.float32)[:, None]
    np.testing.assert_allclose(linear.logreg_logits(arrays, scaled), logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(linear.logreg_logits(linear.fit_logreg(X * 7, y, 3, C=100.0), X), logits,
                               rtol=1e-3, atol=1e-3)


def test_format_1_folders_still_read(tmp_path):
    X, _ = _blobs(1)
    W = np.arange(48, dtype=np.float32).reshape(3, 16) / 48
    b = np.array([0.1, -0.2, 0.3], np.float32)
    meta = {"format": "deepfeat-classifier", "format_version": 1, "method": "logreg", "params": {"C": 1.0},
            "temperature": 1.0, "threshold": 0.0, "classes": ["a", "b", "c"], "dim": 16, "descriptor": {}}
    Classifier(meta, {"weight": W, "bias": b}).save(tmp_path / "v1")
    clf = Classifier.load(tmp_path / "v1")
    np.testing.assert_allclose(clf.logits(X), X @ W.T + b, rtol=1e-5, atol=1e-5)  # rows as they are
    meta2 = dict(meta, format_version=2)
    np.testing.assert_allclose(Classifier(meta2, {"weight": W, "bias": b}).logits(X),
                               linear.l2_rows(X) @ W.T + b, rtol=1e-5, atol=1e-5)
