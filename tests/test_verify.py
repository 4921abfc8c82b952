"""Local features, spatial verification and the cached local-feature section, on real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2")

from deepfeat.cli import main
from deepfeat.errors import StoreError, UsageError
from deepfeat.localfeat.cache import LocalFeatureCache, build_local_features
from deepfeat.localfeat.features import LocalExtractor, parse_local_spec
from deepfeat.localfeat.verify import VerifyParams, count_inliers, mutual_matches, parse_verify_spec, verify_ranking
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.search import SearchEngine
from deepfeat.store import FeatureStore

from .local_sections import kill_and_resume


def _rotated_crop(src: str, out: Path, angle: float = 15.0) -> Path:
    """The photo rotated by *angle* degrees and cropped to its central ~75%, re-encoded."""
    img = Image.open(src).convert("RGB")
    w, h = img.size
    img.rotate(angle, resample=Image.Resampling.BICUBIC).crop(
        (int(w * 0.1), int(h * 0.1), int(w * 0.85), int(h * 0.9))).save(out, quality=85)
    return out


@pytest.fixture(scope="module")
def edited(photos, tmp_path_factory) -> Path:
    return _rotated_crop(photos["astronaut"], tmp_path_factory.mktemp("edit") / "astronaut_rot.jpg")


@pytest.mark.parametrize("spec,many,few", [("cnn", 20, 8), ("cnn:scales=1/0.707", 25, 8), ("sift", 150, 10),
                                           ("orb", 150, 12)])
def test_rotated_copy_has_many_inliers_unrelated_few(lite0, photos, edited, spec, many, few):
    ex = LocalExtractor(spec, lite0)
    q = ex.extract(str(edited))
    params = VerifyParams()
    same = count_inliers(q, ex.extract(photos["astronaut"]), params)
    others = [count_inliers(q, ex.extract(photos[n]), params) for n in ("chelsea", "coffee", "rocket", "hubble")]
    assert same >= many, (spec, same)
    assert max(others) <= few, (spec, others)
    assert same >= 4 * max(max(others), 1)


def test_keypoints_are_in_original_pixels_and_restricted_to_a_region(lite0, photos):
    ex = LocalExtractor("cnn", lite0)
    f = ex.extract(photos["chelsea"])
    w, h = Image.open(photos["chelsea"]).size
    assert f.image_size == (w, h) and ex.layer == "blocks.4"
    assert 20 <= len(f) <= 500 and f.desc.shape == (len(f), 112)
    assert (f.xy[:, 0] >= 0).all() and (f.xy[:, 0] <= w).all() and (f.xy[:, 1] <= h).all()
    assert np.allclose(np.linalg.norm(f.desc, axis=1), 1, atol=1e-5)
    # a stride-16 layer at a 640-pixel frame: keypoints on a 16-pixel grid of the frame
    assert np.allclose(f.sizes, 16 * max(w, h) / 640, rtol=0.05)
    box = (50, 40, w // 2, h // 2)
    sub = f.within(box)
    assert 0 < len(sub) < len(f)
    assert (sub.xy[:, 0] >= 50).all() and (sub.xy[:, 0] <= w // 2).all() and (sub.xy[:, 1] >= 40).all()


def test_mutual_matching_is_mutual():
    q = np.eye(4, dtype=np.float32)[[0, 1, 2, 2]]  # two query rows want database row 2
    d = np.eye(4, dtype=np.float32)[[2, 0, 1]]
    qi, di = mutual_matches(q, d)
    assert sorted(zip(qi.tolist(), di.tolist())) == [(0, 1), (1, 2), (2, 0)]  # row 3 loses row 2 to row 2
    b = np.random.default_rng(0).integers(0, 256, size=(16, 32), dtype=np.uint8)  # 256-bit binary descriptors
    qi, di = mutual_matches(b, b[::-1].copy(), binary=True)
    assert (di == len(b) - 1 - qi).all() and len(qi) == len(b)


def test_verification_moves_the_true_match_up_and_keeps_the_rest(lite0, photos, edited):
    ex = LocalExtractor("cnn", lite0)
    names = ["coffee", "chelsea", "astronaut", "rocket", "hubble"]
    db = [ex.extract(photos[n]) for n in names]
    q = ex.extract(str(edited))
    res = verify_ranking(q, [0, 1, 2, 3, 4], db.__getitem__, VerifyParams(top=4))
    assert res.rows.tolist() == [2, 0, 1, 3, 4]  # verified match first; the others in their order
    assert res.inliers[2] >= 20 and set(res.inliers) == {0, 1, 2, 3}  # the 5th was not verified
    assert res.scores[0] > 1.0 >= res.scores[1]


def test_specs_are_parsed_and_bad_ones_rejected():
    s = parse_local_spec("cnn:layer=blocks.3,max=300,size=512,scales=1/0.707")
    assert (s.layer, s.max_keypoints, s.size, s.scales) == ("blocks.3", 300, 512, (1.0, 0.707))
    assert str(parse_local_spec("sift")) == "sift:max=1000,size=640"
    for bad, msg in [("surf", "unknown local-feature extractor 'surf'; choose cnn, sift, orb"),
                     ("cnn:max=0", "max must be a positive integer"), ("sift:layer=x", "is not one of max=..."),
                     ("cnn:scales=1/9", "scales must be numbers in"), ("cnn:size=10", "at least 32"),
                     ("orb:max", "is not one of")]:
        with pytest.raises(UsageError, match=msg):
            parse_local_spec(bad)
    v = parse_verify_spec("20:weight=2,cap=10,model=homography")
    assert (v.top, v.weight, v.cap, v.model) == (20, 2.0, 10, "homography")
    assert parse_verify_spec("0") is None and parse_verify_spec(None) is None
    for bad, msg in [("x", "give N"), ("5:foo=1", "is not one of"), ("5:cap=x", "cap must be a int"),
                     ("5:model=projective", "choose similarity, affine, homography"), ("-1", "at least 1"),
                     ("5:ratio=1.5", r"ratio must be in \[0, 1\)")]:
        with pytest.raises(UsageError, match=msg):
            parse_verify_spec(bad)
    with pytest.raises(Exception, match="nope"):
        from deepfeat.models import load_model

        LocalExtractor("cnn:layer=nope", load_model("efficientnet_lite0"))


@pytest.fixture(scope="module")
def vstore(photos, edited, tmp_path_factory) -> Path:
    """A store of the five photos plus another photo's crop, with cached cnn local features."""
    root = tmp_path_factory.mktemp("vdb")
    for n, p in photos.items():
        Image.open(p).save(root / f"{n}.jpg", quality=92)
    out = tmp_path_factory.mktemp("vst") / "store"
    extract(ExtractConfig(inputs=[str(root)], output=str(out), pooling="gem", size="long:512", shard_size=2,
                          workers=0, progress="none"))
    return out


def test_cached_section_is_self_describing_and_matches_direct_extraction(vstore, lite0, tmp_path):
    rep = build_local_features(vstore, "cnn")
    assert rep["shards_done"] == 3 and rep["images"] == 5 and rep["keypoints"] > 100
    st = FeatureStore(vstore)
    meta = st.meta["local_features"]["cnn"]
    assert {k: meta[k] for k in ("extractor", "layer", "max_keypoints", "dim", "dtype", "version", "model")} == {
        "extractor": "cnn", "layer": "blocks.4", "max_keypoints": 500, "dim": 112, "dtype": "float16",
        "version": 1, "model": "efficientnet_lite0"}
    cache = LocalFeatureCache(st)
    ex = LocalExtractor("cnn", lite0)
    for row in (0, 3):
        direct = ex.extract(st.resolve_path(st.paths[row]))
        cached = cache[row]
        assert np.array_equal(cached.xy, direct.xy) and cached.image_size == direct.image_size
        assert np.allclose(cached.desc, direct.desc, atol=2e-3)  # stored as float16
    # again: nothing to do; a different spec under the same name is refused, under another name it is kept
    assert build_local_features(vstore, "cnn")["shards_skipped"] == 3
    with pytest.raises(StoreError, match="already has local features 'cnn' made differently"):
        build_local_features(vstore, "cnn:max=50")
    assert main(["local-features", str(vstore), "--extractor", "orb:max=300", "--name", "orb300"]) == 0
    assert LocalFeatureCache(FeatureStore(vstore), "orb300")[0].desc.dtype == np.uint8
    with pytest.raises(UsageError, match="has no local features 'sift'; it has: cnn, orb300"):
        LocalFeatureCache(FeatureStore(vstore), "sift")
    assert main(["local-features", str(vstore), "--extractor", "harris"]) == 2


def test_search_verify_by_file_by_id_and_with_a_region(vstore, edited, capsys):
    build_local_features(vstore, "cnn")
    assert main(["search", str(vstore), str(edited), "--verify", "4", "-k", "3", "--json"]) == 0
    captured = capsys.readouterr()
    hits = json.loads(captured.out)[0]["hits"]
    assert Path(hits[0]["path"]).name == "astronaut.jpg" and hits[0]["inliers"] >= 20
    assert all(h["inliers"] < 10 for h in hits[1:]) and "matching + RANSAC" in captured.err
    eng = SearchEngine(vstore)
    row = eng.row(next(p for p in eng.paths if p.endswith("chelsea.jpg")))
    assert main(["search", str(vstore), str(eng.ids[row]), "--verify", "4", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "inliers" in out and "chelsea.jpg" not in out.split("\n", 1)[1]  # by id: itself excluded
    w, h = Image.open(edited).size
    assert main(["search", str(vstore), str(edited), "--bbox", f"0,0,{w // 2},{h // 2}", "--verify", "3",
                 "-k", "1"]) == 0
    assert "astronaut.jpg" in capsys.readouterr().out
    qlf = eng.query_local_features(row=row, bbox=(0, 0, 100, 100))
    assert len(qlf) and (qlf.xy <= 100).all()
    np.save(Path(vstore).parent / "q.npy", eng.xb[0])
    assert main(["search", str(vstore), str(Path(vstore).parent / "q.npy"), "--verify", "3"]) == 2
    assert ".npy vectors have no keypoints" in capsys.readouterr().err


def test_verify_without_cached_features_says_how_to_make_them(photos, tmp_path, capsys):
    out = tmp_path / "plain"
    extract(ExtractConfig(inputs=[photos["coffee"], photos["rocket"]], output=str(out), workers=0, progress="none"))
    assert main(["search", str(out), photos["coffee"], "--verify", "2"]) == 2
    assert "no cached local features; compute them once with `deepfeat local-features" in capsys.readouterr().err


def test_extract_with_local_features_and_oxford_eval_with_verify(vstore, edited, photos, tmp_path, capsys):
    """eval --gt oxford:DIR --verify: query regions restrict the query's cached keypoints."""
    root = tmp_path / "ox"
    root.mkdir()
    for n, p in photos.items():
        Image.open(p).save(root / f"{n}.jpg", quality=92)
    Image.open(edited).save(root / "astronaut_rot.jpg", quality=92)
    out = tmp_path / "oxstore"
    assert main(["extract", str(root), "-o", str(out), "--size", "long:512", "--local-features", "cnn",
                 "--workers", "0", "--progress", "none"]) == 0
    assert "local features cnn (cnn:max=500,size=640): 6 images" in capsys.readouterr().out
    assert main(["extract", str(root), "-o", str(tmp_path / "x"), "--local-features", "surf"]) == 2
    assert not (tmp_path / "x").exists()  # a bad spec fails before extracting
    gt = tmp_path / "gt"
    gt.mkdir()
    w, h = Image.open(edited).size
    (gt / "astro_1_query.txt").write_text(f"oxc1_astronaut_rot 5 5 {w - 5} {h - 5}\n")
    (gt / "astro_1_good.txt").write_text("astronaut_rot\nastronaut\n")
    (gt / "astro_1_ok.txt").write_text("")
    (gt / "astro_1_junk.txt").write_text("")
    res_file = tmp_path / "res.json"
    assert main(["eval", str(out), "--gt", f"oxford:{gt}", "--verify", "5", "--json", str(res_file)]) == 0
    doc = json.loads(res_file.read_text())
    assert doc["results"][0]["map"] == pytest.approx(1.0) and doc["verify"]["top"] == 5
    assert "verified the top 5" in capsys.readouterr().err


@pytest.mark.slow
def test_local_features_survive_kill_and_resume_identically(collection, tmp_path):
    n_before, res, got, want = kill_and_resume(collection, tmp_path, "cnn", "cnn")
    assert 0 < n_before < 8
    assert res.returncode == 0, res.stderr
    assert f"{8 - n_before} shard(s) done, {n_before} already done" in res.stdout
    assert got == want and len(got) == 8  # the temporary file of the killed shard, if any, is gone too


def test_sweep_verify_columns(photos, tmp_path, capsys):
    """sweep --verify N: each post-processing column gets a '+verify N' twin."""
    root = tmp_path / "pairs"
    for n, p in photos.items():
        (root / n).mkdir(parents=True)
        Image.open(p).save(root / n / "orig.jpg", quality=92)
        _rotated_crop(p, root / n / "rot.jpg", angle=-12)
    out = tmp_path / "sw"
    assert main(["sweep", str(root), "--gt", "folders", "--pools", "gem", "--post", "l2", "--verify", "4",
                 "--out", str(out), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "| layer | pooling | l2 | l2 +verify 4 |" in text
    doc = json.loads((out / "sweep_folders.json").read_text())
    cells = {c["post"]: c for c in doc["cells"]}
    assert cells["l2 +verify 4"]["map"] == pytest.approx(1.0) and cells["l2 +verify 4"]["map"] >= cells["l2"]["map"]
    assert cells["l2 +verify 4"]["verify_ms_per_query"] > 0
    assert main(["sweep", str(root), "--gt", "folders", "--verify", "4:model=projective", "--out", str(out)]) == 2


def test_serve_verify_switch(vstore, edited, photos, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("python_multipart")
    from fastapi.testclient import TestClient

    from deepfeat.serve import create_app

    build_local_features(vstore, "cnn")
    with TestClient(create_app(vstore)) as client:
        info = client.get("/api/info").json()
        assert info["local_features"]["cnn"] == "cnn:max=500,size=640"
        r = client.post("/api/search/upload", params={"k": 2, "verify": 4},
                        files={"file": ("q.jpg", edited.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert Path(body["hits"][0]["path"]).name == "astronaut.jpg" and body["hits"][0]["inliers"] >= 20
        assert len(body["hits"]) == 2 and "verify" in body["took_ms"]
        eng = SearchEngine(vstore)
        item = int(eng.ids[eng.paths.index(next(p for p in eng.paths if p.endswith("coffee.jpg")))])
        hits = client.get(f"/api/search/item/{item}", params={"k": 3, "verify": 3}).json()["hits"]
        assert all("inliers" in h for h in hits) and item not in [h["id"] for h in hits]
        plain = client.get(f"/api/search/item/{item}", params={"k": 3}).json()["hits"]
        assert all("inliers" not in h for h in plain)
        page = client.get("/static/app.js").text
        assert "verify=${VERIFY_TOP}" in page and 'id="verify-input"' in client.get("/").text
    bare = tmp_path / "bare"
    extract(ExtractConfig(inputs=[photos["coffee"], photos["rocket"]], output=str(bare), workers=0, progress="none"))
    with TestClient(create_app(bare)) as client:
        assert client.get("/api/info").json()["local_features"] == {}
        r = client.get("/api/search/item/0", params={"verify": 2})
        assert r.status_code == 422 and "no cached local features" in r.json()["error"]
