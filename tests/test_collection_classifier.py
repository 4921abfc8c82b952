"""Your own classifier (deepfeat.collection): fit on real photos, answer 'unknown' for a foreign one,
reload in a fresh process with the same probabilities, and the CLI (fit-classifier, classify --classifier)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

pytest.importorskip("sklearn")

from deepfeat.cli import main
from deepfeat.collection import Classifier
from deepfeat.collection.fitting import fit_from
from deepfeat.errors import FormatError, UsageError

KNOWN = ("chelsea", "coffee", "astronaut", "rocket")  # the foreign class: hubble


def _views(img: Image.Image) -> dict[str, Image.Image]:
    w, h = img.size
    return {"crop": img.crop((w // 10, h // 10, w - w // 8, h - h // 12)), "mirror": ImageOps.mirror(img),
            "dark": ImageEnhance.Brightness(img).enhance(0.6), "small": img.resize((w // 2, h // 2)),
            "tight": img.crop((w // 6, h // 6, w - w // 6, h - h // 6))}


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory, photos) -> Path:
    """Four views of each of four sample photos, one class folder per photo."""
    root = tmp_path_factory.mktemp("labelled")
    for name in KNOWN:
        d = root / name
        d.mkdir()
        for view, im in list(_views(Image.open(photos[name]).convert("RGB")).items())[:4]:
            im.save(d / f"{view}.jpg")
    return root


@pytest.fixture(scope="module")
def clf_dir(labelled_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "clf"
    fit_from(labelled_dir, out, extract_options={"workers": 0}, figure=False)
    return out


def test_recovers_classes_and_refuses_a_foreign_photo(clf_dir, photos, tmp_path):
    clf = Classifier.load(clf_dir)
    assert clf.classes == sorted(KNOWN)
    assert clf.meta["cv"]["accuracy"] == 1.0
    assert clf.meta["descriptor"]["model"]["spec"] == "efficientnet_lite0"
    # views never seen in training: a tighter crop of each known photo
    new = []
    for name in KNOWN:
        p = tmp_path / f"{name}_tight.jpg"
        _views(Image.open(photos[name]).convert("RGB"))["tight"].save(p)
        new.append(str(p))
    results = clf.classify_files(new + [photos["hubble"]], k=2)
    assert [r.label for r in results[:4]] == list(KNOWN)
    assert all(r.predictions[0].prob >= clf.threshold for r in results[:4])
    foreign = results[4]
    assert foreign.predictions[0].prob < clf.threshold and foreign.label == "unknown"
    # a threshold you set: 0 never refuses
    clf.threshold = 0.0
    assert clf.classify_files([photos["hubble"]])[0].label in KNOWN
    with pytest.raises(UsageError):
        clf.threshold = 1.5


@pytest.mark.slow
def test_same_probabilities_in_a_fresh_process(clf_dir, photos):
    clf = Classifier.load(clf_dir)
    here = clf.predict_proba(clf.embedder.embed_files([photos["coffee"], photos["hubble"]])[0])
    code = ("import json, sys; from deepfeat.collection import Classifier; c = Classifier.load(sys.argv[1]); "
            "X, _ = c.embedder.embed_files(sys.argv[2:]); print(json.dumps(c.predict_proba(X).tolist()))")
    out = subprocess.run([sys.executable, "-c", code, str(clf_dir), photos["coffee"], photos["hubble"]],
                         capture_output=True, text=True, check=True).stdout
    np.testing.assert_allclose(np.array(json.loads(out)), here, atol=1e-6)
    assert abs(here.sum(axis=1) - 1).max() < 1e-5


def test_embedder_matches_the_training_store(clf_dir):
    from deepfeat.store import FeatureStore

    store = FeatureStore(clf_dir / "train-store")
    clf = Classifier.load(clf_dir)
    X, errors = clf.embedder.embed_files(store.paths[:3])
    assert errors == [None] * 3
    cos = (X * store.vectors()[:3]).sum(axis=1)
    assert cos.min() > 0.99  # torch here, ONNX Runtime in extract: one tolerance


def test_knn_and_a_store_with_gt(clf_dir, tmp_path):
    clf = fit_from(clf_dir / "train-store", tmp_path / "knn", gt="folders", method="knn", threshold=0.5,
                   figure=False)
    assert clf.method == "knn" and clf.threshold == 0.5 and clf.meta["threshold_rule"] == "given"
    store_X = __import__("deepfeat").FeatureStore(clf_dir / "train-store").vectors()
    idx, _ = Classifier.load(tmp_path / "knn").predict(store_X)
    assert (idx >= 0).all() and len(set(idx.tolist())) == 4


def test_cli_fit_and_classify(labelled_dir, clf_dir, photos, tmp_path, capsys):
    assert main(["classify", photos["hubble"], photos["coffee"], "--classifier", str(clf_dir), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    hubble, coffee = doc["results"]
    assert hubble["label"] == "unknown" and coffee["label"] == "coffee"
    assert coffee["predictions"][0]["label"] == "coffee" and 0.0 < coffee["predictions"][0]["prob"] <= 1.0
    assert main(["classify", photos["coffee"], "--classifier", str(clf_dir), "--top", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{photos['coffee']}: ") and " coffee" in line and "unknown" not in line
    # fitting from a store via the CLI, with a fixed threshold
    out = tmp_path / "clf2"
    assert main(["fit-classifier", str(clf_dir / "train-store"), "-o", str(out), "--threshold", "0.4",
                 "--method", "logreg"]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy 100.0%" in text and "chelsea" in text
    assert (out / "confusion.png").stat().st_size > 1000


def test_refuses_bad_files_and_inputs(tmp_path, clf_dir):
    with pytest.raises(UsageError, match="classifier.json"):
        Classifier.load(tmp_path)
    (tmp_path / "classifier.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(FormatError, match="deepfeat-classifier"):
        Classifier.load(tmp_path)
    clf = Classifier.load(clf_dir)
    with pytest.raises(UsageError, match="descriptors"):
        clf.predict_proba(np.zeros((2, 7), np.float32))
    from deepfeat.collection.classifier import fit_classifier

    with pytest.raises(UsageError, match="at least 2 images"):
        fit_classifier(np.eye(3, dtype=np.float32), np.array([0, 1, 1]), ["a", "b"], {})
