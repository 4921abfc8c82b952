"""Duplicates: exact, re-encoded, mirrored, cropped-and-rotated and recompressed copies of
real photos are grouped; two halves of one deep-field photo (the same kind of scene,
different pixels) are not; a chain forms one group; the keeper policy; the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from deepfeat.collection.candidates import knn_pairs, l2_normalised, unique_pairs
from deepfeat.collection.duplicates import DuplicateSettings, find_duplicates, group_vectors
from deepfeat.collection.groups import FileFacts, choose_keeper, connected_components, parse_keep
from deepfeat.errors import UsageError
from deepfeat.index import Index
from deepfeat.pipeline import ExtractConfig, extract

pytest.importorskip("cv2")


def make_copies(photos: dict[str, str], root: Path) -> dict[str, str]:
    """The duplicate collection of these tests: name -> file."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        p = root / name
        img.save(p, **kw)
        out[name] = str(p)

    cat = Image.open(photos["chelsea"]).convert("RGB")
    shutil.copyfile(photos["chelsea"], root / "cat.jpg")
    out["cat.jpg"] = str(root / "cat.jpg")
    shutil.copyfile(photos["chelsea"], root / "cat_exact.jpg")
    out["cat_exact.jpg"] = str(root / "cat_exact.jpg")
    save("cat_png.png", cat)
    w, h = cat.size
    save("cat_croprot.jpg", cat.rotate(15, resample=Image.Resampling.BICUBIC)
         .crop((int(0.12 * w), int(0.1 * h), int(0.82 * w), int(0.85 * h))), quality=90)
    coffee = Image.open(photos["coffee"]).convert("RGB")
    save("coffee.jpg", coffee, quality=92)
    save("coffee_mirror.jpg", ImageOps.mirror(coffee), quality=90)
    rocket = Image.open(photos["rocket"]).convert("RGB")
    save("rocket.jpg", rocket, quality=92)
    save("rocket_small.jpg", rocket.resize((rocket.width // 2, rocket.height // 2), Image.Resampling.BICUBIC),
         quality=15)
    astro = Image.open(photos["astronaut"]).convert("RGB")
    w, h = astro.size
    for name, (x0, x1) in {"astro_a.jpg": (0.0, 0.55), "astro_b.jpg": (0.2, 0.8), "astro_c.jpg": (0.45, 1.0)}.items():
        save(name, astro.crop((int(x0 * w), 0, int(x1 * w), h)), quality=92)
    hubble = Image.open(photos["hubble"]).convert("RGB")
    w, h = hubble.size
    save("hubble_left.jpg", hubble.crop((0, 0, w // 2, h)), quality=92)
    save("hubble_right.jpg", hubble.crop((w // 2, 0, w, h)), quality=92)
    return out


@pytest.fixture(scope="module")
def dup_store(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("dups")
    files = make_copies(photos, root / "images")
    store = root / "store"
    extract(ExtractConfig(inputs=[str(root / "images")], output=str(store), pooling="gem", workers=0,
                          progress="none"))
    return store, files


def group_of(report, name: str) -> set[str]:
    for g in report.to_dict()["groups"]:
        names = {Path(m).name for m in g["members"]}
        if name in names:
            return names
    return {name}


def test_copies_grouped_and_similar_scene_not(dup_store):
    store, _ = dup_store
    rep = find_duplicates(store)
    assert group_of(rep, "cat.jpg") == {"cat.jpg", "cat_exact.jpg", "cat_png.png", "cat_croprot.jpg"}
    assert group_of(rep, "coffee.jpg") == {"coffee.jpg", "coffee_mirror.jpg"}
    assert group_of(rep, "rocket.jpg") == {"rocket.jpg", "rocket_small.jpg"}
    assert group_of(rep, "astro_a.jpg") == {"astro_a.jpg", "astro_b.jpg", "astro_c.jpg"}  # a chain, one group
    assert group_of(rep, "hubble_left.jpg") == {"hubble_left.jpg"}
    kinds = {(Path(p["a"]).name, Path(p["b"]).name): p["kind"] for g in rep.to_dict()["groups"] for p in g["pairs"]}
    assert kinds[("cat.jpg", "cat_exact.jpg")] == "bytes"
    assert "pixels" in {kinds.get(("cat.jpg", "cat_png.png")), kinds.get(("cat_exact.jpg", "cat_png.png"))}
    verified = [p for g in rep.to_dict()["groups"] for p in g["pairs"] if p["kind"] == "verified"]
    assert verified and all(p["inliers"] >= rep.settings.min_inliers for p in verified)


def test_hubble_halves_are_a_hard_negative(dup_store):
    """The two halves pass the global threshold (so geometry is what keeps them apart)."""
    store, _ = dup_store
    rep = find_duplicates(store, verify=False, threshold=0.5)
    assert "hubble_right.jpg" in group_of(rep, "hubble_left.jpg")


def test_keeper_and_json(dup_store):
    store, _ = dup_store
    d = find_duplicates(store).to_dict()
    json.dumps(d)
    g = next(g for g in d["groups"] if any(m.endswith("rocket.jpg") for m in g["members"]))
    assert g["keeper"].endswith("rocket.jpg")  # more pixels than the half-size copy
    assert set(g["files"]) == set(g["members"])
    for member in g["members"]:
        f = g["files"][member]
        assert f["bytes"] == Path(f["file"]).stat().st_size and len(f["sha256"]) == 64


def test_csv_rows(dup_store):
    store, _ = dup_store
    rep = find_duplicates(store)
    rows = rep.csv_rows()
    assert rows[0][:3] == ["group", "path", "role"]
    assert len(rows) - 1 == sum(len(g.rows) for g in rep.groups)
    assert sum(r[2] == "keep" for r in rows[1:]) == len(rep.groups)


def test_connected_components_chain():
    assert connected_components(6, np.array([0, 1, 4]), np.array([1, 2, 5])) == [[0, 1, 2], [4, 5]]
    assert connected_components(3, np.array([], np.int64), np.array([], np.int64)) == []


def test_keep_policy():
    facts = [FileFacts("b.jpg", 100, 50, 3), FileFacts("a.jpg", 100, 80, 5), FileFacts("c.jpg", 90, 999, 1)]
    assert choose_keeper(facts, parse_keep("pixels,bytes,oldest")) == 1
    assert choose_keeper(facts, parse_keep("oldest")) == 2
    assert choose_keeper(facts, parse_keep("pixels,newest")) == 1
    assert choose_keeper(facts, parse_keep("path")) == 1
    with pytest.raises(UsageError, match="unknown"):
        parse_keep("biggest")
    with pytest.raises(UsageError, match="contradict"):
        parse_keep("oldest,newest")


def test_knn_pairs_blocks_match_brute_force():
    rng = np.random.default_rng(0)
    x = l2_normalised(rng.standard_normal((500, 16)))
    x[250:260] = l2_normalised(x[:10] + 0.05 * rng.standard_normal((10, 16)))
    index = Index.build(x, kind="flat")
    small = knn_pairs(x, index, 0.8, k=5, block=7)
    big = knn_pairs(x, index, 0.8, k=5, block=10_000)
    assert np.array_equal(small.a, big.a) and np.array_equal(small.b, big.b)
    sim = x @ x.T
    a, b = np.nonzero(np.triu(sim >= 0.8, 1))
    assert set(zip(a.tolist(), b.tolist())) == set(zip(small.a.tolist(), small.b.tolist()))
    groups, _ = group_vectors(x, 0.8, k=5)
    assert groups == connected_components(len(x), a, b)
    assert all(any({i, 250 + i} <= set(g) for g in groups) for i in range(10))  # the planted copies


def test_unique_pairs_keeps_the_best_score():
    p = unique_pairs(np.array([0, 0, 1]), np.array([1, 1, 2]), np.array([0.5, 0.9, 0.7], np.float32))
    assert p.a.tolist() == [0, 1] and p.b.tolist() == [1, 2] and p.score.tolist() == pytest.approx([0.9, 0.7])


def test_bad_settings():
    with pytest.raises(UsageError, match="threshold"):
        DuplicateSettings(threshold=1.5)
    with pytest.raises(UsageError, match="min-inliers"):
        DuplicateSettings(min_inliers=1)


def test_gallery_html_is_self_contained_and_png(dup_store, tmp_path):
    from deepfeat.collection.gallery import gallery_html, gallery_png

    store, _ = dup_store
    rep = find_duplicates(store)
    page = Path(gallery_html(rep, tmp_path / "dups.html")).read_text()
    srcs = [s.split('"')[0] for s in page.split(' src="')[1:]]
    assert len(srcs) == sum(len(g.rows) for g in rep.groups)
    assert all(s.startswith("data:image/jpeg;base64,") for s in srcs)  # nothing outside the page
    assert page.count("class=keep") == len(rep.groups)
    png = Image.open(gallery_png(rep, tmp_path / "dups.png"))
    assert png.width >= 128 * max(len(g.rows) for g in rep.groups) and png.height >= 128 * len(rep.groups)


def test_query_new_images_against_the_collection(dup_store, tmp_path, photos):
    from deepfeat.collection.query import query_duplicates

    store, files = dup_store
    cat = Image.open(photos["chelsea"]).convert("RGB")
    new_copy = tmp_path / "cat_new.jpg"
    cat.resize((cat.width * 2 // 3, cat.height * 2 // 3)).save(new_copy, quality=70)
    exact = tmp_path / "rocket_again.jpg"
    shutil.copyfile(files["rocket.jpg"], exact)
    res = {Path(r.query).name: r for r in query_duplicates(store, [str(new_copy), str(exact)])}
    assert {Path(m.path).name for m in res["cat_new.jpg"].matches} >= {"cat.jpg", "cat_png.png"}
    assert any(m.kind == "bytes" and Path(m.path).name == "rocket.jpg" for m in res["rocket_again.jpg"].matches)


def test_query_add_appends_to_the_store_when_asked(dup_store, tmp_path, photos, capsys):
    """--query NEW --add-unique appends only what the store lacks; --add appends duplicates too;
    without either the store is unchanged; the added images are then found as any other."""
    from skimage import data as skdata

    from deepfeat.cli import main
    from deepfeat.store import FeatureStore

    src, _ = dup_store
    store = tmp_path / "store"
    shutil.copytree(src, store)  # the module's store stays as it is for the other tests
    n0 = len(FeatureStore(store).paths)
    cat = Image.open(photos["chelsea"]).convert("RGB")
    cat_new = tmp_path / "new" / "cat_smaller.jpg"
    cat_new.parent.mkdir()
    cat.resize((cat.width * 2 // 3, cat.height * 2 // 3)).save(cat_new, quality=70)
    camera = tmp_path / "new" / "camera.jpg"  # a real photo the store does not have
    Image.fromarray(skdata.camera()).convert("RGB").save(camera, quality=90)

    assert main(["duplicates", str(store), "--query", str(cat_new), str(camera)]) == 0
    assert len(FeatureStore(store).paths) == n0  # a query alone changes nothing
    capsys.readouterr()
    assert main(["duplicates", str(store), "--query", str(cat_new), str(camera), "--add-unique"]) == 0
    out = capsys.readouterr().out
    assert f"not added {cat_new}: duplicate of" in out and "added 1 image(s)" in out
    names = [Path(p).name for p in FeatureStore(store).paths]
    assert len(names) == n0 + 1 and "camera.jpg" in names and "cat_smaller.jpg" not in names

    assert main(["duplicates", str(store), "--query", str(cat_new), str(camera), "--add"]) == 0
    out = capsys.readouterr().out
    assert f"not added {camera}: already in the store" in out and "added 1 image(s)" in out
    names = [Path(p).name for p in FeatureStore(store).paths]
    assert len(names) == n0 + 2 and names.count("camera.jpg") == 1
    rep = find_duplicates(store)  # the added copy is grouped with its original; the new photo alone
    assert {"cat.jpg", "cat_smaller.jpg"} <= group_of(rep, "cat_smaller.jpg")
    assert group_of(rep, "camera.jpg") == {"camera.jpg"}


def test_query_add_needs_query(dup_store):
    from deepfeat.cli import main

    store, _ = dup_store
    assert main(["duplicates", str(store), "--add"]) == 2
    assert main(["duplicates", str(store), "--query", "x.jpg", "--add", "--add-unique"]) == 2


def test_serve_duplicates_view(dup_store):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from deepfeat.serve import create_app

    store, files = dup_store
    with TestClient(create_app(store)) as client:
        page = client.get("/duplicates")
        assert page.status_code == 200 and "/static/duplicates.js" in page.text
        assert client.get("/static/duplicates.js").status_code == 200
        doc = client.get("/api/duplicates").json()
        cat = next(g for g in doc["groups"] if any(m.endswith("/cat.jpg") for m in g["members"]))
        assert {Path(m).name for m in cat["members"]} == {"cat.jpg", "cat_exact.jpg", "cat_png.png", "cat_croprot.jpg"}
        assert len(cat["ids"]) == len(cat["members"]) and cat["keeper_id"] in cat["ids"]
        assert client.get(f"/api/items/{cat['keeper_id']}/thumbnail").status_code == 200
        with open(files["cat.jpg"], "rb") as f:
            up = client.post("/api/duplicates/query", files={"file": ("mine.jpg", f.read(), "image/jpeg")})
        assert up.status_code == 200, up.text
        assert up.json()["duplicate"] and {m["kind"] for m in up.json()["matches"]} >= {"bytes"}
        plain = client.get("/api/duplicates", params={"verify": "false", "threshold": 0.5}).json()
        assert any("hubble_right.jpg" in " ".join(g["members"]) for g in plain["groups"])
