"""The fine-tuned run's descriptor: recorded in meta.json, used by extract, measured by
--eval-retrieval; the warning when accuracy rose but retrieval did not; the curves picture;
the side-by-side descriptor comparison. Tiny sets of real photo crops at 64 x 64."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from deepfeat.finetune import FinetuneConfig, finetune
from deepfeat.finetune import data as D
from deepfeat.finetune.report import retrieval_warning

SOURCES = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, photos) -> Path:
    """DATA/<class>/<image>.jpg: five crops of one real photo per class."""
    root = tmp_path_factory.mktemp("labelled-desc")
    for cls, src in SOURCES.items():
        d = root / cls
        d.mkdir()
        img = Image.open(photos[src]).convert("RGB")
        w, h = img.size
        for j in range(5):
            f = 0.55 + 0.07 * j
            cw, ch = int(w * f), int(h * f)
            x0, y0 = (j * 41) % max(1, w - cw), (j * 29) % max(1, h - ch)
            im = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((80, 72), Image.Resampling.BICUBIC)
            (ImageOps.mirror(im) if j % 2 else im).save(d / f"{cls}_{j}.jpg", quality=90)
    return root


TINY = dict(image_size=64, batch_size=4, head_epochs=2, epochs=1, train_blocks="2", seed=0, progress="none",
            workers=2, eval_retrieval=True, lr=0.01)


def _val_map(out: Path, store_dir: Path, classes: list[str]) -> float:
    from deepfeat.finetune.retrieval import evaluate_descriptors
    from deepfeat.store import FeatureStore

    val = D.read_split(out / "val.txt", json.loads((out / "check.json").read_text())["root"], len(classes))
    store = FeatureStore(store_dir)
    order = {p: i for i, p in enumerate(store.paths)}
    x = store.vectors()[[order[v.path] for v in val]]
    return evaluate_descriptors(x, [v.label for v in val], [v.path for v in val], classes).map


def test_recorded_descriptor_is_what_extract_uses(labelled, tmp_path):
    """A run with a non-default descriptor (MAC on blocks.6): meta.json records it, and
    `extract --model finetuned:RUN` without --layer/--pool extracts exactly it: the store
    says so and gives the mAP that --eval-retrieval reported as "after"."""
    from deepfeat.cli import main
    from deepfeat.store import FeatureStore

    out = tmp_path / "run"
    res = finetune(FinetuneConfig(data=str(labelled), output=str(out), eval_layer="blocks.6", eval_pool="mac", **TINY))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["descriptor"] == {"layer": "blocks.6", "pooling": "mac", "post": "l2", "chosen_by": "options"}
    ret = json.loads((out / "retrieval.json").read_text())
    assert ret["layer"] == "blocks.6" and ret["pooling"] == "mac" and ret["pooling_before"] == "mac"
    assert meta["retrieval"]["after"]["map"] == pytest.approx(res.retrieval["after"]["map"])

    val = D.read_split(out / "val.txt", json.loads((out / "check.json").read_text())["root"], 3)
    (tmp_path / "val.lst").write_text("".join(v.path + "\n" for v in val))
    rc = main(["extract", f"@{tmp_path / 'val.lst'}", "-o", str(tmp_path / "store"), "--model", f"finetuned:{out}",
               "--workers", "0", "--progress", "none", "--backend", "torch"])
    assert rc == 0
    store = FeatureStore(tmp_path / "store")
    assert store.meta["layers"] == ["blocks.6"] and store.meta["pooling"] == "mac"
    assert store.dim == 320  # blocks.6 of EfficientNet-Lite0 has 320 channels
    assert _val_map(out, tmp_path / "store", res.classes) == pytest.approx(res.retrieval["after"]["map"], abs=1e-4)

    # an explicit --pool still wins over the recorded one
    main(["extract", f"@{tmp_path / 'val.lst'}", "-o", str(tmp_path / "gem"), "--model", f"finetuned:{out}",
          "--pool", "gem", "--workers", "0", "--progress", "none", "--backend", "torch"])
    assert FeatureStore(tmp_path / "gem").meta["pooling"].startswith("gem")


def test_default_descriptor_recorded_and_curves_written(labelled, tmp_path):
    out = tmp_path / "dflt"
    res = finetune(FinetuneConfig(data=str(labelled), output=str(out), **TINY))
    meta = json.loads((out / "meta.json").read_text())
    d = meta["descriptor"]
    assert d["layer"] == "bn2" and d["chosen_by"] == "default" and meta["default_layer"] == "bn2"
    import deepfeat
    from deepfeat.pipeline import default_layer, default_pooling

    m = deepfeat.load_model(f"finetuned:{out}")
    assert default_layer(m) == d["layer"] and default_pooling(m) == d["pooling"]
    assert default_pooling(deepfeat.load_model("efficientnet_lite0")) == "gem"
    # the curves: a real PNG with loss, accuracy and mAP panels, one point per epoch
    png = out / "curves.png"
    assert png.is_file()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1260, 340)  # three 4.2 x 3.4 in panels at 100 dpi
        px = np.asarray(im.convert("L"))
    assert px.min() < 100 and px.std() > 10  # something is drawn, not a blank canvas
    assert len(res.history) == 3 and all(h.get("val_map") is not None for h in res.history)


def test_curves_without_retrieval_have_two_panels(tmp_path):
    from deepfeat.finetune.curves import write_curves

    hist = [{"epoch": 1, "stage": "head", "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.1, "val_acc": 0.4},
            {"epoch": 2, "stage": "full", "train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.7, "val_acc": 0.7}]
    path = write_curves(tmp_path, hist)
    with Image.open(path) as im:
        assert im.size == (840, 340)
    assert write_curves(tmp_path / "none", []) is None and not (tmp_path / "none").exists()


def test_retrieval_warning_rules():
    # the case: 98.5% accuracy on 10 classes, mAP 87.7 -> 88.4
    w = retrieval_warning(0.985, 10, 0.877, 0.884, {"layer": "bn2", "pooling": "gem:p=3"})
    assert w and "98.5%" in w and "87.70 to 88.40 (+0.70)" in w and "bn2 + gem:p=3" in w
    assert retrieval_warning(0.985, 10, 0.877, 0.95) is None  # retrieval rose too
    assert retrieval_warning(0.12, 10, 0.877, 0.877) is None  # nothing learned: no claim about a gain lost
    assert retrieval_warning(None, 10, 0.5, 0.5) is None


def test_warning_fires_when_only_the_head_learned(labelled, tmp_path, caplog):
    """Constructed case: only the head trains (--epochs 0), so the classifier learns these
    easy classes while the descriptors are exactly the base model's: the run warns, in the
    log, in retrieval.json, in meta.json and in the result."""
    out = tmp_path / "head-only"
    with caplog.at_level(logging.WARNING, logger="deepfeat.finetune.report"):
        res = finetune(FinetuneConfig(data=str(labelled), output=str(out), **{**TINY, "head_epochs": 6,
                                                                             "epochs": 0, "lr": 0.05,
                                                                             "head_stage_lr": 0.05}))
    assert res.val_accuracy is not None and res.val_accuracy > 1 / 3 + 0.05
    assert res.retrieval["after"]["map"] == pytest.approx(res.retrieval["before"]["map"], abs=1e-6)
    assert len(res.warnings) == 1 and "retrieval did not" in res.warnings[0]
    assert any("retrieval did not" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "retrieval.json").read_text())["warning"] == res.warnings[0]
    assert json.loads((out / "meta.json").read_text())["retrieval"]["warning"] == res.warnings[0]


def test_compare_descriptors_side_by_side(labelled, tmp_path):
    from deepfeat.finetune.descriptors import compare_run

    out = tmp_path / "cmp"
    res = finetune(FinetuneConfig(data=str(labelled), output=str(out), **TINY))
    rep = compare_run(str(out))
    names = [d["name"] for d in rep["descriptors"]]
    assert names[0] == "bn2 + GeM p=3" and "logits" in names and "softmax" in names
    assert any(n.startswith("penultimate") for n in names)
    # the run's own measurement of its descriptor is reproduced by the comparison
    assert rep["after"]["bn2 + GeM p=3"]["map"] == pytest.approx(res.retrieval["after"]["map"], abs=1e-4)
    assert rep["before"]["bn2 + GeM p=3"]["map"] == pytest.approx(res.retrieval["before"]["map"], abs=1e-4)
    # the head's input of EfficientNet is the average-pooled bn2: the same ranking
    pen = next(n for n in names if n.startswith("penultimate"))
    assert rep["after"][pen]["map"] == pytest.approx(rep["after"]["bn2 + average"]["map"], abs=1e-5)
    # only the trained units moved (train_blocks 2: conv_head, bn2)
    wc = rep["weight_change"]
    assert wc["conv_head"] > 0 and wc["blocks.5"] == 0 and wc["conv_stem"] == 0


def test_cosine_head_trains_saves_and_loads(labelled, tmp_path):
    """--head cosine: a bias-free head on L2-normalised features, its scale saved with it;
    finetuned:RUN rebuilds it and classifies the held-out images as the run measured."""
    import deepfeat
    from deepfeat.finetune.heads import CosineHead
    from deepfeat.models.classify import classify

    out = tmp_path / "cos"
    res = finetune(FinetuneConfig(data=str(labelled), output=str(out), head="cosine", head_scale=12.0, **TINY))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["head"] == {"name": "head_ft", "module": "classifier", "kind": "cosine", "in_features": 1280,
                            "num_classes": 3, "scale": 12.0}
    m = deepfeat.load_model(f"finetuned:{out}")
    head = m.net.get_submodule("classifier")
    assert isinstance(head, CosineHead) and float(head.scale) == 12.0
    val = D.read_split(out / "val.txt", json.loads((out / "check.json").read_text())["root"], 3)
    results = classify(m, [v.path for v in val], k=1)
    right = sum(r.predictions[0].label == res.classes[v.label] for r, v in zip(results, val))
    assert right / len(val) == pytest.approx(res.val_accuracy)
    with pytest.raises(Exception, match="--head"):
        finetune(FinetuneConfig(data=str(labelled), output=str(tmp_path / "bad"), head="arc", **TINY))
