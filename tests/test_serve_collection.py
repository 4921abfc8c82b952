"""The collection views of `deepfeat serve` (deepfeat.serve.collection_routes): your classifier on
uploads (the store's own vectors, or the classifier's own model when its descriptors differ), the
Map view's page and its data, a real server process with --classifier, and in Chromium the Map
view's click that searches and the search page's classifier line (skipped without Chromium)."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
from fastapi.testclient import TestClient

from deepfeat.collection import Classifier
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.serve import create_app

from .test_collection_classifier import KNOWN, _views, clf_dir, labelled_dir  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def queries(photos, tmp_path_factory) -> dict[str, Path]:
    """A view of each known photo never seen in training ('tight' is the fifth view), and the foreign hubble."""
    out = tmp_path_factory.mktemp("queries")
    q = {}
    for name in KNOWN:
        q[name] = out / f"{name}.jpg"
        _views(Image.open(photos[name]).convert("RGB"))["tight"].save(q[name])
    q["hubble"] = Path(photos["hubble"])
    return q


@pytest.fixture(scope="module")
def train_store(clf_dir) -> Path:  # noqa: F811
    return clf_dir / "train-store"


def _upload(client, path: Path, top: int = 3):
    return client.post("/api/classify/upload", params={"top": top},
                       files={"file": (path.name, path.read_bytes(), "image/jpeg")})


def _check_labels(client, clf_dir, queries, shared: bool):  # noqa: F811
    clf = Classifier.load(clf_dir)
    want = {r.path: r for r in clf.classify_files([str(p) for p in queries.values()], k=3)}
    for name, path in queries.items():
        r = _upload(client, path)
        assert r.status_code == 200, r.text
        body = r.json()
        res = body["results"][0]
        assert body["classifier"]["descriptors"] == ("store" if shared else "own")
        assert res["label"] == (name if name in KNOWN else "unknown"), res
        ref = want[str(path)]
        assert [p["label"] for p in res["predictions"]] == [p.label for p in ref.predictions]
        np.testing.assert_allclose([p["prob"] for p in res["predictions"]], [p.prob for p in ref.predictions],
                                   atol=2e-3)
        assert res["threshold"] == pytest.approx(clf.threshold)


def test_classifier_labels_uploads_with_the_store_vectors(train_store, clf_dir, queries):  # noqa: F811
    app = create_app(train_store, classifier=str(clf_dir), map_method="pca")
    with TestClient(app) as client:
        info = client.get("/api/classifier").json()["classifier"]
        assert info["classes"] == sorted(KNOWN) and info["descriptors"].startswith("the store's")
        _check_labels(client, clf_dir, queries, shared=True)
        r = client.post("/api/classify/upload", files={"file": ("notes.jpg", b"not a photo", "image/jpeg")})
        assert r.status_code == 415 and "error" in r.json()
        assert client.post("/api/classify/upload", params={"top": 0},
                           files={"file": ("a.jpg", queries["coffee"].read_bytes())}).status_code == 422


def test_classifier_with_other_descriptors_uses_its_own_model(labelled_dir, clf_dir, queries, tmp_path):  # noqa: F811
    store = tmp_path / "mac-store"  # the same photos, pooled by MAC: not the classifier's GeM descriptors
    extract(ExtractConfig(inputs=[str(labelled_dir)], output=str(store), pooling="mac", post="l2", workers=0,
                          progress="none"))
    app = create_app(store, classifier=str(clf_dir), map_method="pca")
    with TestClient(app) as client:
        assert client.get("/api/classifier").json()["classifier"]["descriptors"] == "its own model's"
        _check_labels(client, clf_dir, {k: queries[k] for k in ("coffee", "hubble")}, shared=False)
        data = _map_data(client.get("/map").text)
        assert "label" not in data["colourings"]  # the classifier's labels need the store's descriptors


def test_without_a_classifier(train_store, queries):
    with TestClient(create_app(train_store, map_method="pca")) as client:
        assert client.get("/api/classifier").json() == {"classifier": None}
        r = _upload(client, queries["coffee"])
        assert r.status_code == 404 and "--classifier" in r.json()["error"]


def _map_data(page: str) -> dict:
    m = re.search(r"<script type=application/json id=map-data>(.*?)</script>", page, re.DOTALL)
    assert m, page[:500]
    return json.loads(m.group(1))


def test_map_view_page_and_data(train_store, clf_dir):  # noqa: F811
    app = create_app(train_store, classifier=str(clf_dir), map_method="pca")
    with TestClient(app) as client:
        r = client.get("/map")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert "<script>" not in r.text and "<style>" not in r.text  # the CSP allows no inline script or style
        data = _map_data(r.text)
        n = len(data["ids"])
        assert n == 16 and len(data["xy"]) == n and len(data["paths"]) == n
        assert set(data["colourings"]) == {"folder", "outlier", "label"}
        label = data["colourings"]["label"]
        assert sorted(label["names"]) == sorted(KNOWN)  # the training images: every one recognised
        assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in data["xy"])
        thumb = data["thumbs"][0]
        assert thumb == f"/api/items/{data['ids'][0]}/thumbnail?size=96"
        t = client.get(thumb)
        assert t.status_code == 200 and Image.open(io.BytesIO(t.content)).size[0] <= 96
        js = client.get("/map/map.js")
        assert js.headers["content-type"].startswith("text/javascript") and "deepfeatMapClick" in js.text
        assert "#map-results" in client.get("/map/map.css").text
        assert client.get("/static/mapview.js").status_code == 200
        assert client.get("/map").text == r.text  # laid out once, then kept


def test_bad_map_method(train_store):
    from deepfeat.errors import UsageError

    with pytest.raises(UsageError, match="map method"):
        create_app(train_store, map_method="spiral")


@pytest.mark.slow
def test_a_real_server_process_with_a_classifier(train_store, clf_dir, labelled_dir, queries):  # noqa: F811
    import httpx

    from .test_serve import server_process

    with server_process(train_store, labelled_dir, "--classifier", str(clf_dir), "--map-method", "pca") as url, \
            httpx.Client(base_url=url, timeout=60) as h:
        r = h.post("api/classify/upload", files={"file": ("q.jpg", queries["rocket"].read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["results"][0]["label"] == "rocket"
        assert h.get("map").status_code == 200


def test_browser_map_click_searches_and_page_shows_labels(train_store, clf_dir, queries):  # noqa: F811
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    from .test_serve_browser import CHROMIUM, Browser, LiveServer

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    app = create_app(train_store, classifier=str(clf_dir), map_method="pca")
    with LiveServer(app) as srv, Browser(srv.url) as b:
        page = b.page
        page.goto(srv.url + "map")
        page.wait_for_function("() => document.getElementById('map').dataset.thumbsLoaded !== undefined")
        assert page.eval_on_selector("#map", "c => [c.dataset.thumbsLoaded, c.dataset.thumbsFailed]") == ["16", "0"]
        assert page.eval_on_selector_all("#legend i", "is => is.map((i) => i.style.background !== '')") == [True] * 4
        x, y = page.evaluate("() => window.deepfeatMap.toScreen(5)")
        box = page.eval_on_selector("#map", "c => { const r = c.getBoundingClientRect(); return [r.left, r.top]; }")
        page.mouse.click(box[0] + x, box[1] + y)
        picked = page.eval_on_selector("#map", "c => Number(c.dataset.picked)")
        picked_id = page.evaluate(f"() => window.deepfeatMap.data.ids[{picked}]")
        page.wait_for_function(f"() => document.body.dataset.searchedId === '{picked_id}'")
        page.wait_for_function("() => [...document.querySelectorAll('#map-hits img')].every((i) => i.complete)")
        hits = page.eval_on_selector_all("#map-hits button", "bs => bs.map((b) => [b.dataset.id, "
                                                              "b.querySelector('img').naturalWidth > 0, b.title])")
        assert len(hits) == 12 and all(ok for _, ok, _ in hits)
        folder = page.evaluate(f"() => window.deepfeatMap.data.paths[{picked}]").split("/")[-2]
        assert all(f"/{folder}/" in t for _, _, t in hits[:3]), hits  # its other views come first
        assert str(picked_id) not in [i for i, _, _ in hits]
        # the search page: an upload gets the classifier's line
        page.goto(srv.url)
        page.set_input_files("#file-input", str(queries["chelsea"]))
        page.wait_for_function("() => document.getElementById('labels').dataset.label !== undefined")
        assert page.eval_on_selector("#labels", "l => l.dataset.label") == "chelsea"
        assert page.text_content("#labels").startswith("your classifier: ")
        page.set_input_files("#file-input", str(queries["hubble"]))
        page.wait_for_function("() => document.getElementById('labels').dataset.label === 'unknown'")
        assert "unknown (below" in page.text_content("#labels")
        assert b.errors == [] and b.foreign == []
