"""Classification of real photos and of broken inputs, through the library and the CLI."""

from __future__ import annotations

import json

from deepfeat.cli import main
from deepfeat.models.classify import classify

from .conftest import CAT_CLASSES, ESPRESSO


def test_classify_real_photos(lite0, photos):
    res = classify(lite0, [photos["chelsea"], photos["coffee"]], k=3, batch_size=2)
    assert [r.ok for r in res] == [True, True]
    cat, coffee = res
    assert cat.predictions[0].index in CAT_CLASSES and "cat" in cat.predictions[0].label
    assert coffee.predictions[0].index == ESPRESSO and coffee.predictions[0].label == "espresso"
    probs = [p.prob for p in cat.predictions]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6


def test_classify_mixed_bad_inputs_keeps_order(lite0, photos, odd_images, tmp_path):
    paths = [str(odd_images["truncated.jpg"]), photos["coffee"], str(tmp_path / "missing.jpg"),
             str(odd_images["cmyk.jpg"]), str(odd_images["not_image.jpg"]), photos["chelsea"]]
    res = classify(lite0, paths, k=1, batch_size=2)
    assert [r.path for r in res] == paths
    assert [r.ok for r in res] == [False, True, False, True, False, True]
    assert "truncated" in res[0].error and "not found" in res[2].error and "not an image" in res[4].error
    assert res[1].predictions[0].index == ESPRESSO
    assert res[3].predictions[0].index in CAT_CLASSES and "cmyk" in res[3].notes
    assert res[5].predictions[0].index in CAT_CLASSES


def test_cli_classify_json_and_exit_codes(photos, odd_images, capsys):
    rc = main(["classify", photos["coffee"], str(odd_images["empty.jpg"]), "--top", "2", "--json",
               "--device", "cpu"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["classified"] == 1 and doc["summary"]["failed"] == 1
    assert doc["results"][0]["predictions"][0]["label"] == "espresso"
    assert len(doc["results"][0]["predictions"]) == 2
    assert "empty file" in doc["results"][1]["error"]
    # nothing could be classified -> non-zero exit, but a report for each input
    rc = main(["classify", str(odd_images["empty.jpg"]), str(odd_images["truncated.jpg"])])
    out = capsys.readouterr()
    assert rc == 1 and out.out.count("ERROR") == 2 and "0/2 images classified" in out.err


def test_cli_classify_text(photos, capsys):
    assert main(["classify", photos["chelsea"], "-k", "1"]) == 0
    out = capsys.readouterr()
    assert "chelsea_cat.jpg: " in out.out and "cat" in out.out
    assert "images/s" in out.err


def test_cli_usage_errors(capsys):
    assert main(["classify", "x.jpg", "--model", "nope"]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["classify", "x.jpg", "--device", "tpu"]) == 2
    assert main(["classify", "x.jpg", "--top", "0"]) == 2


def test_cli_layers_and_models(capsys):
    assert main(["layers", "--size", "320", "320"]) == 0
    out = capsys.readouterr().out
    assert "conv_head" in out and "1280x10x10" in out and "conv_stem.weight" in out and "32x3x3x3" in out
    assert main(["layers", "--json", "--no-params"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["input_shape"] == [3, 224, 224] and any(l["name"] == "bn2.act:in" for l in doc["layers"])
    assert main(["models", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    embedded = next(r for r in doc if r["source"] == "embedded")
    assert embedded["ready"] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert {r["source"] for r in doc} >= {"embedded", "timm", "torchvision"}
