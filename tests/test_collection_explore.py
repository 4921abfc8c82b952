"""Clusters, outliers and their gallery pages on real descriptors of real photos."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

pytest.importorskip("sklearn")
pytest.importorskip("faiss")

from deepfeat.cli import main
from deepfeat.collection.clusters import agreement, cluster
from deepfeat.collection.outliers import class_margins, knn_outlier_scores
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.store import FeatureStore

GROUPS = ("chelsea", "coffee", "astronaut", "rocket")


@pytest.fixture(scope="module")
def store(tmp_path_factory, photos) -> Path:
    """Five views of each of four photos (one folder each) and one foreign photo (hubble) on its own."""
    root = tmp_path_factory.mktemp("views")
    for name in GROUPS:
        img = Image.open(photos[name]).convert("RGB")
        w, h = img.size
        d = root / name
        d.mkdir()
        img.crop((w // 10, h // 10, w - w // 8, h - h // 12)).save(d / "crop.jpg")
        ImageOps.mirror(img).save(d / "mirror.jpg")
        ImageEnhance.Brightness(img).enhance(0.6).save(d / "dark.jpg")
        img.resize((w // 2, h // 2)).save(d / "small.jpg")
        img.crop((w // 6, h // 6, w - w // 6, h - h // 6)).save(d / "tight.jpg")
    (root / "misc").mkdir()
    Image.open(photos["hubble"]).convert("RGB").save(root / "misc" / "hubble.jpg")
    out = tmp_path_factory.mktemp("st") / "store"
    extract(ExtractConfig(inputs=[str(root)], output=str(out), pooling="gem", post="l2", workers=0, progress="none"))
    return out


def _group(path: str) -> str:
    return os.path.basename(os.path.dirname(path))


def test_kmeans_recovers_the_groups(store):
    st = FeatureStore(store)
    keep = [i for i, p in enumerate(st.paths) if _group(p) in GROUPS]
    X, truth = st.vectors()[keep], [_group(st.paths[i]) for i in keep]
    c = cluster(X, k=4)
    assert agreement(truth, c.labels) == {"nmi": 1.0, "ari": 1.0}
    # representatives are members, nearest the centre first
    for i in range(c.k):
        reps = c.representatives[i]
        assert set(reps) <= set(c.members(i).tolist()) and len(reps) == 5
        sims = X[reps] @ c.centroids[i]
        assert np.all(np.diff(sims) <= 1e-6)


def test_automatic_k_finds_the_groups(store):
    st = FeatureStore(store)
    keep = [i for i, p in enumerate(st.paths) if _group(p) in GROUPS]
    X, truth = st.vectors()[keep], [_group(st.paths[i]) for i in keep]
    for auto in ("hdbscan", "silhouette"):
        c = cluster(X, auto=auto, ks=range(2, 8))
        assert c.k == 4, (auto, c.how)
        assert agreement(truth, c.labels)["nmi"] == 1.0


def test_planted_foreign_photo_ranks_first(store):
    st = FeatureStore(store)
    for k in (1, 3, 4):
        s = knn_outlier_scores(st.vectors(), k=k)
        assert st.paths[int(np.argmax(s))].endswith("hubble.jpg"), k
    # a photo put in the wrong class folder is closer to its real class
    X = st.vectors()
    y = np.array([GROUPS.index(_group(p)) if _group(p) in GROUPS else -1 for p in st.paths])
    keep = y >= 0
    X, y = X[keep], y[keep]
    wrong = int(np.nonzero(y == GROUPS.index("coffee"))[0][0])
    y[wrong] = GROUPS.index("rocket")
    margin, other = class_margins(X, y, len(GROUPS))
    assert int(np.argmin(margin)) == wrong and margin[wrong] < 0 and other[wrong] == GROUPS.index("coffee")
    assert (np.delete(margin, wrong) > 0).all()


def test_large_store_outliers_candidates_rescored_exactly(store):
    """Above the exact size, candidates come from a compressed (IVF-PQ) index and are re-scored from
    the vectors themselves: where the candidates cover every row, the scores are the exact ones, and
    with fewer candidates than rows the foreign photo still ranks first."""
    X = FeatureStore(store).vectors()
    paths = FeatureStore(store).paths
    exact = knn_outlier_scores(X, k=10)
    approx = knn_outlier_scores(X, k=10, exact_max=0)  # 3 x 11 candidates >= the 21 rows
    np.testing.assert_allclose(approx, exact, atol=1e-5)
    few = knn_outlier_scores(X, k=3, exact_max=0)  # 12 candidates of 21 rows
    assert paths[int(np.argmax(few))].endswith("hubble.jpg")
    assert np.all(few >= knn_outlier_scores(X, k=3) - 1e-5)  # a missed neighbour can only raise a score


def test_cli_clusters_outputs(store, tmp_path, capsys):
    csv_path, links, page = tmp_path / "c.csv", tmp_path / "links", tmp_path / "c.html"
    assert main(["clusters", str(store), "--k", "5", "--json", "--csv", str(csv_path), "--export", str(links),
                 "--html", str(page)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["k"] == 5 and sum(c["size"] for c in doc["clusters"]) == 21
    st = FeatureStore(store)
    for c in doc["clusters"]:
        assert set(c["representatives"]) <= set(c["members"]) <= set(st.paths)
        assert len({_group(p) for p in c["members"]}) == 1  # each group (and the foreign photo) alone
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["path"] for r in rows} == set(st.paths)
    assert sorted(p.name for p in links.iterdir()) == [f"cluster_{i:03d}" for i in range(5)]
    linked = [q for d in links.iterdir() for q in d.iterdir()]
    assert len(linked) == 21 and all(q.is_symlink() and q.resolve().is_file() for q in linked)
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") == 21 and "<section>" in html
    assert main(["clusters", str(store), "--k", "5", "--export", str(links)]) == 2  # not empty: refused


def test_cli_outliers(store, tmp_path, capsys):
    page = tmp_path / "o.html"
    assert main(["outliers", str(store), "--k", "3", "--top", "3", "--html", str(page)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "nearest neighbours" in lines[0] and lines[1].endswith("hubble.jpg") and len(lines) == 4
    assert page.read_text().count("data:image/jpeg") == 3
    assert main(["outliers", str(store), "--gt", "folders", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["ranked"]) == 20  # the foreign photo is alone in its folder: no margin
    assert all(r["margin"] > 0 for r in doc["ranked"])
