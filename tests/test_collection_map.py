"""deepfeat map: the 2-D layout (PCA, t-SNE, the subsample and neighbour placement), its colourings
and the self-contained page and PNG, on real descriptors of real photo views."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("faiss")

from deepfeat.cli import main
from deepfeat.collection.layout import layout, place_by_neighbours
from deepfeat.collection.maps import build_map, map_html
from deepfeat.errors import UsageError
from deepfeat.store import FeatureStore

from .test_collection_explore import GROUPS, _group, store  # noqa: F401  (views of four photos + a foreign one)


def _page_data(html: str) -> dict:
    m = re.search(r'<script type=application/json id=map-data>(.*?)</script>', html, re.DOTALL)
    return json.loads(m.group(1))


def test_tsne_layout_keeps_the_groups_apart(store):  # noqa: F811
    st = FeatureStore(store)
    lay = layout(st.vectors(), "tsne")
    assert lay.xy.shape == (21, 2) and lay.xy.dtype == np.float32 and lay.laid_out.all()
    assert lay.xy.min() >= 0 and lay.xy.max() <= 1 + 1e-6
    groups = np.array([_group(p) for p in st.paths])
    # every view is nearer (in 2-D) to another view of its own photo than to any other photo's view
    d = np.linalg.norm(lay.xy[:, None] - lay.xy[None], axis=2)
    np.fill_diagonal(d, np.inf)
    for i in np.nonzero(groups != "misc")[0]:
        assert groups[int(np.argmin(d[i]))] == groups[i], st.paths[i]


def test_subsample_and_neighbour_placement(store):  # noqa: F811
    X = FeatureStore(store).vectors()
    # twice the store: each copy lands exactly where its laid-out twin is
    XX = np.concatenate([X, X])
    lay = layout(XX, "pca", max_points=21, k=1, seed=3)
    assert lay.laid_out.sum() == 21 and "placed at the mean position of their 1 nearest" in lay.how
    for i in np.nonzero(~lay.laid_out)[0]:
        twin = i + 21 if i < 21 else i - 21
        if lay.laid_out[twin]:
            np.testing.assert_allclose(lay.xy[i], lay.xy[twin], atol=1e-5)
    # the mean of the k nearest laid-out positions
    xy_b = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    xb = np.eye(3, dtype=np.float32)
    q = np.array([[0.9, 0.5, 0.0]], np.float32) / np.linalg.norm([0.9, 0.5, 0.0])
    np.testing.assert_allclose(place_by_neighbours(xb, xy_b, q.astype(np.float32), k=2), [[0.5, 0.0]])


def test_colourings_and_page(store, tmp_path):  # noqa: F811
    st = FeatureStore(store)
    m = build_map(st.vectors(), st.paths, method="pca", colour_by=["folder", "cluster", "outlier"], k=5)
    folder = m.colourings["folder"]
    assert sorted(folder.names) == sorted([*GROUPS, "misc"])
    assert [folder.names[v] for v in folder.values] == [_group(p) for p in st.paths]
    assert len(set(m.colourings["cluster"].values.tolist())) == 5
    out = m.colourings["outlier"].values
    assert st.paths[int(np.argmax(out))].endswith("hubble.jpg")
    thumbs = ["data:image/jpeg;base64,AAAA"] * 20 + [None]
    doc = _page_data(map_html(m, thumbs))
    assert len(doc["xy"]) == len(doc["paths"]) == 21 and doc["thumbs"][-1] is None
    assert set(doc["colourings"]) == {"folder", "cluster", "outlier"}
    with pytest.raises(UsageError, match="--classifier"):
        build_map(st.vectors(), st.paths, colour_by=["label"])
    with pytest.raises(UsageError, match="choose from"):
        build_map(st.vectors(), st.paths, colour_by=["colour"])
    with pytest.raises(UsageError, match="layout method"):
        layout(st.vectors(), "mds")


def test_cli_map_writes_a_self_contained_page_and_png(store, tmp_path, capsys):  # noqa: F811
    pytest.importorskip("matplotlib")
    page, png = tmp_path / "map.html", tmp_path / "map.png"
    assert main(["map", str(store), "-o", str(page), "--png", str(png), "--method", "tsne",
                 "--colour-by", "folder,outlier", "--thumbnails", "12"]) == 0
    assert f"wrote {page} (12 thumbnails; coloured by folder, outlier)" in capsys.readouterr().out
    html = page.read_text()
    doc = _page_data(html)
    assert sum(t is not None for t in doc["thumbs"]) == 12
    assert all(t.startswith("data:image/jpeg;base64,") for t in doc["thumbs"] if t)
    # nothing to fetch: no external script, stylesheet or image
    assert not re.search(r'<(script|link)[^>]+(src|href)=', html) and "http" not in html
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a store written by a labelled classifier: label colouring needs it
    assert main(["map", str(store), "-o", str(page), "--colour-by", "label"]) == 2
