"""deepfeat recipe: a small sweep picks the best setting; the file round-trips into extract/search/eval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepfeat.cli import main
from deepfeat.store import FeatureStore

from .test_search import views  # noqa: F401  (module fixture: 5 photos x 4 edited views)


@pytest.fixture(scope="module")
def recipe(views, photos, tmp_path_factory):  # noqa: F811
    """A recipe whose winner carries a fitted chain: R-MAC + PCA-whitening learned on separate photos."""
    out = tmp_path_factory.mktemp("recipe") / "r.json"
    fit = tmp_path_factory.mktemp("fit")
    for name, p in photos.items():  # the 5 originals: a separate set (the store holds edited views)
        (fit / f"{name}.jpg").write_bytes(open(p, "rb").read())
    assert main(["recipe", str(views), "--gt", "folders", "-o", str(out), "--pools", "rmac",
                 "--post", "pca-whiten:4,l2", "--rerank", "none,kreciprocal:k1=3,k2=2", "--no-regional",
                 "--fit-on", str(fit), "--workers", "0"]) == 0
    return out


def test_recipe_file_describes_itself_and_every_candidate(recipe):
    doc = json.loads(recipe.read_text())
    assert doc["kind"] == "deepfeat-recipe" and doc["version"] == 1 and doc["protocol"] == "folders"
    ex, se = doc["extract"], doc["search"]
    assert ex["model"] == "efficientnet_lite0" and ex["layer"] == "bn2" and ex["pooling"] == "rmac:L=3"
    assert ex["scales"] == [1.0] and ex["size"] == "model" and ex["post_spec"] == "pca-whiten:4,l2"
    assert ex["post"] == "r.post.npz" and (recipe.parent / "r.post.npz").is_file()  # fitted: travels as a file
    assert set(se) == {"qe", "alpha", "dba", "rerank"}
    maps = [c["map"] for c in doc["candidates"]]
    # 2 re-rankings, then qe/dba (5/0, 0/5, 5/5) with the winner's re-ranking and without
    first = doc["candidates"][:2]
    n_rr = 1 if max(first, key=lambda c: c["map"])["rerank"] is None or first[0]["map"] >= first[1]["map"] else 2
    assert len(doc["candidates"]) == 2 + 3 * n_rr
    assert [(c["qe"], c["dba"]) for c in doc["candidates"][2::n_rr]] == [(5, 0), (0, 5), (5, 5)]
    assert doc["map"] == max(maps) and "5 originals" not in doc["fit_on"] and "5 images" in doc["fit_on"]
    assert {c["rerank"] for c in doc["candidates"]} == {None, "kreciprocal:k1=3,k2=2"}


def test_recipe_round_trips_into_extract_and_eval(recipe, views, tmp_path, capsys):  # noqa: F811
    doc = json.loads(recipe.read_text())
    store = tmp_path / "st"
    assert main(["extract", str(views), "-o", str(store), "--recipe", str(recipe), "--workers", "0",
                 "--progress", "none"]) == 0
    meta = FeatureStore(store).meta
    assert meta["pooling"] == "rmac:L=3" and meta["layers"] == ["bn2"] and meta["scales"] == [1.0]
    assert FeatureStore(store).post.spec.startswith("pca-whiten:4")
    capsys.readouterr()
    res = tmp_path / "ev.json"
    assert main(["eval", str(store), "--gt", "folders", "--recipe", str(recipe), "--json", str(res)]) == 0
    err = capsys.readouterr().err
    assert "not made as the recipe says" not in err
    got = json.loads(res.read_text())
    assert (got["qe"], got["dba"]) == (doc["search"]["qe"], doc["search"]["dba"])
    assert (got["rerank"] or {}).get("rerank", None) == (doc["search"]["rerank"] and
                                                         _canonical(doc["search"]["rerank"]))
    assert got["results"][0]["map"] == pytest.approx(doc["map"], abs=1e-3)  # the measured winner, reproduced
    # search takes it too; an explicit flag overrides the recipe and says so
    q = str(views / "coffee" / "dark.jpg")
    assert main(["search", str(store), q, "--recipe", str(recipe), "--top", "3", "--qe", "1", "--json"]) == 0
    cap = capsys.readouterr()
    assert [h["path"].split("/")[-2] for h in json.loads(cap.out)[0]["hits"]] == ["coffee"] * 3
    if doc["search"]["qe"] != 1:
        assert "--qe 1 overrides the recipe's" in cap.err


def _canonical(spec):
    from deepfeat.rerank import get_reranker

    return get_reranker(spec).spec


def test_explicit_flags_override_and_conflicts_are_explained(recipe, views, tmp_path, capsys):  # noqa: F811
    store = tmp_path / "gem"
    assert main(["extract", str(views / "coffee"), str(views / "rocket"), "-o", str(store), "--recipe", str(recipe),
                 "--pool", "gem",
                 "--post", "l2", "--workers", "0", "--progress", "none"]) == 0
    err = capsys.readouterr().err
    assert "--pool gem overrides the recipe's rmac:L=3" in err and "--post l2 overrides the recipe's" in err
    assert FeatureStore(store).meta["pooling"] == "gem:p=3"
    # a store made otherwise: search/eval say that the recipe's options were chosen for another descriptor
    assert main(["eval", str(store), "--gt", "folders", "--recipe", str(recipe)]) == 0
    assert "not made as the recipe says (pooling gem:p=3 vs rmac:L=3)" in capsys.readouterr().err
    # --fit-on would refit a chain the recipe already fitted
    assert main(["extract", str(views), "-o", str(tmp_path / "x"), "--recipe", str(recipe), "--fit-on",
                 str(store)]) == 2
    assert "already fitted" in capsys.readouterr().err
    # missing and foreign recipe files
    assert main(["eval", str(store), "--gt", "folders", "--recipe", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "something-else"}))
    assert main(["search", str(store), "0", "--recipe", str(bad)]) == 1
    assert "not a deepfeat recipe" in capsys.readouterr().err
    assert main(["recipe", str(views), "--gt", "folders", "-o", str(tmp_path / "r.txt")]) == 2
    assert main(["recipe", str(views), "--gt", "folders", "-o", str(tmp_path / "r.json"), "--rerank", "nope"]) == 2


def test_multiscale_sweep_descriptors_equal_extract_scales(views, tmp_path):  # noqa: F811
    """The recipe's multi-scale regional candidate is what `extract --scales` stores."""
    from deepfeat.models import load_model
    from deepfeat.pipeline import ExtractConfig, extract
    from deepfeat.pooling import get_pooling
    from deepfeat.tune.recipe import MS_SCALES
    from deepfeat.tune.sweep import MultiPoolNet, compute_descriptors

    model = load_model("efficientnet_lite0")
    files = sorted(str(p) for p in (views / "rocket").iterdir())
    net = MultiPoolNet(model, ["bn2"], [get_pooling("rmac")], MS_SCALES).eval()
    ok, arrays, _ = compute_descriptors(files, net, model, workers=0)
    st = tmp_path / "ms"
    extract(ExtractConfig(inputs=files, output=str(st), pooling="rmac", post="none", scales=MS_SCALES, workers=0,
                          progress="none", backend="torch"))
    s = FeatureStore(st)
    order = [s.paths.index(p) for p in files]
    assert ok.all() and np.allclose(arrays[0], s.vectors()[order], atol=1e-4)
